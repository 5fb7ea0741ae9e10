"""The mergeable runner's merge logic, against fake workers: milliseconds, no
executor, no processes.

A fake worker evaluates the calls it is sent in Python. Each client's "update"
is its token, a partial is the tuple of its real clients' tokens, and `merge`
concatenates: so a result names, in order, every client merged into it, and
the tests see the merge order the runner promises (worker order, whatever
order the workers finish in), which workers were dropped and who finished.
The end-to-end behaviour on real workers is covered by the slow tests
(test_distributed_matches_local.py, test_worker_failures.py).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import numpy as np
import pytest
import tensorflow_federated as tff

from coordinator.executor_client import WorkerError
from coordinator.rounds.mergeable import MergeableRunner, NotEnough
from coordinator.rounds.timing import RoundTiming
from shared.preprocessing import EMPTY_CLIENT_TOKEN

STATE = 7


class _Comp:
    """A computation the fake worker runs as `fn`, with the types the runner reads."""

    def __init__(self, name: str, fn: Callable[[Any], Any], parameter=None, result=None):
        self.name, self.fn = name, fn
        self.parameter_type, self.result_type = parameter, result

    def serialize_element(self, index: int, value: Any) -> Any:
        return tuple(value) if index == 1 else value

    def struct_arg(self, elements: list[Any]) -> tuple:
        return tuple(elements)


def _parts() -> dict[str, _Comp]:
    def up_to_merge(arg: tuple) -> tuple:
        state, tokens = arg
        assert state == STATE
        return tuple(t for t in tokens if t != EMPTY_CLIENT_TOKEN)

    def after_merge(arg: tuple) -> dict:
        (state, _tokens), merged = arg
        return {"state": state + 1, "merged": merged}

    return {
        "up_to_merge": _Comp(
            "up_to_merge",
            up_to_merge,
            parameter=tff.StructType([("state", np.int32), ("data", np.int32)]),
        ),
        "merge": _Comp("merge", lambda pair: pair[0] + pair[1]),
        "after_merge": _Comp(
            "after_merge",
            after_merge,
            parameter=tff.StructType([("original_arg", np.int32), ("merged", np.int32)]),
            result=tff.StructType([("state", np.int32), ("metrics", np.int32)]),
        ),
        "partial_done": _Comp("partial_done", lambda _: True),
    }


class FakeWorker:
    """The part of `RemoteWorker` the runner calls, evaluated in Python.

    `fail` names a computation whose call raises `WorkerError` (the worker
    died there); `hold` is an event a share waits on before it starts (a
    worker that is stuck until the test lets it go)."""

    _ids = itertools.count(1)

    def __init__(self, index: int, fail: str | None = None, hold: threading.Event | None = None):
        self.label = self.address = f"worker{index}"
        self.fail, self.hold = fail, hold
        self.values: dict[int, Any] = {}
        self.loaded: set[tuple[str, int]] = set()
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def _new(self, value: Any) -> int:
        ref = next(self._ids)
        with self.lock:
            self.values[ref] = value
        return ref

    def _run(self, comp: _Comp, arg: Any) -> Any:
        if self.hold is not None:
            self.hold.wait()
        self.calls.append(comp.name)
        if comp.name == self.fail:
            raise WorkerError(self.label, f"died in {comp.name}")
        return comp.fn(arg)

    def is_loaded(self, comp: _Comp, clients: int) -> bool:
        return (comp.name, clients) in self.loaded

    def load(self, comp: _Comp, clients: int) -> None:
        self.loaded.add((comp.name, clients))

    def call_proto(self, comp: _Comp, arg: Any, clients: int, timing: Any = None) -> Any:
        self.load(comp, clients)
        return self._run(comp, arg)

    def create_value(self, proto: Any, clients: int = 0) -> int:
        return self._new(proto)

    def create_struct(self, elements: list[tuple[str, int]], clients: int = 0) -> int:
        return self._new(tuple(self.values[ref] for _, ref in elements))

    def create_call(self, comp: _Comp, arg: int, clients: int = 0) -> int:
        self.load(comp, clients)
        return self._new(self._run(comp, self.values[arg]))

    def compute(self, ref: int, clients: int = 0) -> Any:
        return self.values[ref]

    def dispose(self, refs: list[int], clients: int = 0) -> None:
        with self.lock:
            for ref in refs:
                del self.values[ref]  # a ref freed twice fails the test

    @contextlib.contextmanager
    def deadline(self, at: float, why: str) -> Iterator[None]:
        yield


class _Federation:
    def __init__(self, workers: list[FakeWorker]):
        self.workers = workers


@pytest.fixture
def pool() -> Iterator[futures.ThreadPoolExecutor]:
    with futures.ThreadPoolExecutor(4) as executor:
        yield executor


def _run(
    workers: list[FakeWorker],
    pieces: dict[int, list[list[str]]],
    pool: futures.ThreadPoolExecutor,
    **kwargs: Any,
):
    runner = MergeableRunner(_parts(), "train")  # type: ignore[arg-type]
    timing = RoundTiming()
    outcome = runner.run(_Federation(workers), pool, STATE, pieces, timing, 0.0, **kwargs)  # type: ignore[arg-type]
    return outcome, timing


def test_partials_merge_in_worker_order_and_finish_on_the_busiest(pool):
    workers = [FakeWorker(i) for i in range(3)]
    pieces = {0: [["a", "b"]], 1: [["c", "d", "e"]], 2: [["f"]]}
    outcome, timing = _run(workers, pieces, pool)
    assert outcome.result == {"state": STATE + 1, "merged": ("a", "b", "c", "d", "e", "f")}
    assert outcome.delivered == [0, 1, 2] and outcome.lost == {}
    assert outcome.finisher == 1 and not outcome.refinished
    assert workers[1].calls.count("after_merge") == 1
    assert "after_merge" not in workers[0].calls + workers[2].calls
    assert set(timing.per_worker) == {"worker0", "worker1", "worker2"}
    # Nothing is left on any worker: the finisher frees what it kept.
    assert all(not w.values for w in workers)


def test_a_share_in_pieces_is_merged_on_the_worker_in_order(pool):
    workers = [FakeWorker(0), FakeWorker(1)]
    empty = EMPTY_CLIENT_TOKEN
    # Worker 0: two padded pieces of 3 and one unpadded piece of 2 (another
    # count, merged in its own executor and moved once into the main one).
    pieces = {0: [["a", "b", empty], ["c", "d", "e"], ["f", "g"]], 1: [["h"]]}
    outcome, timing = _run(workers, pieces, pool)
    assert outcome.result["merged"] == ("a", "b", "c", "d", "e", "f", "g", "h")
    assert outcome.finisher == 0
    assert timing.per_worker["worker0"].pieces == 3
    assert timing.per_worker["worker0"].clients == 7
    assert timing.per_worker["worker0"].padded_to == 8
    assert all(not w.values for w in workers)


def test_a_failed_worker_is_dropped_and_the_rest_merge_in_order(pool):
    workers = [FakeWorker(0), FakeWorker(1, fail="up_to_merge"), FakeWorker(2)]
    pieces = {0: [["a"]], 1: [["b"]], 2: [["c", "d"]]}
    outcome, _ = _run(workers, pieces, pool)
    assert outcome.result["merged"] == ("a", "c", "d")
    assert outcome.delivered == [0, 2]
    assert list(outcome.lost) == [1] and "died in up_to_merge" in outcome.lost[1]


def test_too_few_partials_are_refused_before_anything_is_finished(pool):
    workers = [FakeWorker(0), FakeWorker(1, fail="up_to_merge")]
    pieces = {0: [["a", "b"]], 1: [["c"]]}
    with pytest.raises(NotEnough) as refused:
        _run(workers, pieces, pool, accept=lambda delivered: len(delivered) == 2)
    assert refused.value.delivered == [0] and list(refused.value.lost) == [1]
    assert "after_merge" not in workers[0].calls


def test_a_finisher_lost_while_finishing_is_replaced_from_the_partials(pool):
    # Worker 1 is the finisher (most clients) and dies in `after_merge`: the
    # next busiest worker that delivered finishes from the partials it sent,
    # without the finisher's own partial, which is lost with it.
    workers = [FakeWorker(0), FakeWorker(1, fail="after_merge"), FakeWorker(2)]
    pieces = {0: [["a", "b"]], 1: [["c", "d", "e"]], 2: [["f"]]}
    outcome, _ = _run(workers, pieces, pool)
    assert outcome.refinished and outcome.finisher == 0
    assert outcome.result == {"state": STATE + 1, "merged": ("a", "b", "f")}
    assert outcome.delivered == [0, 2]
    assert "while finishing it" in outcome.lost[1]
    assert not workers[0].values and not workers[2].values


def test_a_worker_that_misses_the_deadline_is_dropped(pool):
    stuck = threading.Event()
    workers = [FakeWorker(0), FakeWorker(1, hold=stuck), FakeWorker(2)]
    pieces = {0: [["a"]], 1: [["b"]], 2: [["c", "d"]]}
    # Long enough for the fake workers that do deliver, even on a loaded machine.
    try:
        outcome, _ = _run(workers, pieces, pool, phase_timeout=1.0)
    finally:
        stuck.set()
    assert outcome.result["merged"] == ("a", "c", "d")
    assert outcome.delivered == [0, 2]
    assert "not done within the 1s round deadline" in outcome.lost[1]


def test_warm_up_runs_every_part_on_empty_clients_and_frees_it_all():
    worker = FakeWorker(0)
    runner = MergeableRunner(_parts(), "train")  # type: ignore[arg-type]
    runner.warm_up(worker, STATE, 4)  # type: ignore[arg-type]
    assert {name for name, clients in worker.loaded if clients == 4} == {
        "up_to_merge",
        "partial_done",
        "merge",
        "after_merge",
    }
    assert not worker.values
