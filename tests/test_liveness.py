"""The pure parts of surviving failures: sampling over live workers, coverage,
back-off, and the states a worker goes through (with a probe that runs no gRPC)."""

from __future__ import annotations

import json
import logging
import threading

import pytest

from coordinator.federation import Federation, WorkerDescription, sample_clients, sample_live
from coordinator.liveness import Liveness, WorkerState, backoff
from coordinator.rounds.round_executor import required_clients
from shared import shard_format, worker_dir
from shared.errors import FederationError

IDS = [f"c{i:03d}" for i in range(60)]
OWNER = {c: i % 3 for i, c in enumerate(IDS)}


def test_sampling_with_every_worker_live_is_unchanged():
    for round_num in (1, 2, 17):
        expected = sample_clients(IDS, round_num, 10, 0)
        assert sample_live(IDS, OWNER, None, round_num, 10, 0) == expected
        assert sample_live(IDS, OWNER, [0, 1, 2], round_num, 10, 0) == expected


def test_sampling_draws_only_live_workers_clients_reproducibly():
    for round_num in range(1, 50):
        chosen = sample_live(IDS, OWNER, [0, 2], round_num, 10, 0)
        assert len(chosen) == len(set(chosen)) == 10
        assert all(OWNER[c] in (0, 2) for c in chosen)
        # A pure function of the seed, the round and the set of live workers.
        assert chosen == sample_live(IDS, OWNER, (2, 0), round_num, 10, 0)
    assert sample_live(IDS, OWNER, [0, 2], 5, 10, 0) != sample_live(IDS, OWNER, [0, 1], 5, 10, 0)
    # Fewer live clients than a round wants: all of them.
    assert sorted(sample_live(IDS, OWNER, [1], 3, 30, 0)) == [c for c in IDS if OWNER[c] == 1]
    assert sample_live(IDS, OWNER, [], 3, 10, 0) == []


def test_federation_groups_a_live_sample_by_worker():
    fed = Federation([], [], None, sorted(IDS), OWNER)  # type: ignore[arg-type]
    grouped = fed.sample(round_num=4, clients_per_round=12, seed=1, live=[1, 2])
    assert set(grouped) <= {1, 2} and sum(map(len, grouped.values())) == 12


@pytest.mark.parametrize(
    ("per_round", "share", "needed"), [(10, 0.5, 5), (10, 0.51, 6), (10, 1.0, 10), (3, 0.1, 1)]
)
def test_required_clients(per_round, share, needed):
    assert required_clients(per_round, share) == needed


def test_backoff_doubles_up_to_its_cap():
    assert [backoff(1.0, 10.0, k) for k in range(6)] == [1, 2, 4, 8, 10, 10]
    assert backoff(0.5, 30.0, 10_000) == 30.0


def _description(build: str, index: int, clients: tuple[str, ...], pid: int = 1):
    manifest = shard_format.Manifest(
        task=shard_format.Task("sklearn-digits", 10),
        build_id=build,
        shard_index=index,
        num_shards=2,
        partition={},
        clients=tuple(shard_format.ClientEntry(c, 5, 1, "x", "y") for c in clients),
    )
    info = worker_dir.WorkerInfo(pid=pid, started_at=float(pid))
    return WorkerDescription(f"localhost:{1000 + index}", manifest, info)


def test_a_down_worker_is_probed_until_it_serves_its_shard_again(tmp_path):
    before = [_description("b1", 0, ("a", "b")), _description("b1", 1, ("c",))]
    answers: list[object] = [FederationError("not reachable"), FederationError("not reachable")]
    probed = threading.Event()

    def probe(index: int) -> WorkerDescription:
        assert index == 1
        if answers:
            raise answers.pop(0)  # type: ignore[misc]
        probed.set()
        return _description("b1", 1, ("c",), pid=7)  # restarted: another process

    view = tmp_path / "workers.json"
    live = Liveness(before, probe, probe_interval=0.01, probe_interval_max=0.05, view_path=view)
    try:
        assert live.live() == [0, 1]
        live.mark_down(1, "connection lost")
        assert live.live() == [0] and live.state(1) is WorkerState.DOWN
        assert json.loads(view.read_text())["workers"][1]["state"] in ("down", "rejoining")
        assert probed.wait(10)
        for _ in range(200):
            if live.take_rejoining():
                break
            live.wait_for_change(0.05)
        assert live.take_rejoining() == [1]
        assert live.live() == [0]  # only the round loop takes it back
        live.mark_up(1)
        assert live.live() == [0, 1]
        health = live.health(1)
        assert (health.outages, health.rejoins, health.probes) == (1, 1, 3)
        assert json.loads(view.read_text())["workers"][1]["state"] == "up"
    finally:
        live.stop()


def test_a_worker_back_with_another_shard_is_refused(caplog):
    before = [_description("b1", 0, ("a",)), _description("b1", 1, ("c",))]
    probes = threading.Semaphore(0)

    def probe(index: int) -> WorkerDescription:
        probes.release()
        return _description("b2", 1, ("c",))  # another build of the data

    live = Liveness(before, probe, probe_interval=0.01, probe_interval_max=0.02)
    try:
        with caplog.at_level(logging.ERROR, logger="fedcompose.coordinator"):
            live.mark_down(1, "connection lost")
            for _ in range(3):  # it is probed on, and refused every time
                assert probes.acquire(timeout=10)
        assert live.state(1) is WorkerState.REFUSED
        assert live.take_rejoining() == [] and live.live() == [0]
        refusals = [r.getMessage() for r in caplog.records if "another shard" in r.getMessage()]
        assert len(refusals) == 1, refusals  # said once, not at every probe
        assert "build b2, shard 2 of 2, 1 clients" in refusals[0]
        assert "not taken back" in refusals[0]
    finally:
        live.stop()


def test_round_line_says_what_a_degraded_round_and_a_partial_evaluation_missed():
    from coordinator.trainer import _round_line

    row = {
        "round": 5, "clients": 10, "examples": 400, "train": {"loss": 0.5, "accuracy": 0.8},
        "round_seconds": 1.0, "degraded": 0, "retried": 1, "workers_lost": {}, "clients_lost": 0,
        "clients_sampled": 10, "attempts": 2, "live_workers": [0, 1], "workers_total": 3,
        "eval": {"loss": 0.4, "accuracy": 0.9, "examples": 240, "workers_down": ["worker2"]},
    }  # fmt: skip
    line = _round_line(row)
    # Only an earlier attempt fell short: no "lost with" nobody.
    assert "| retried: attempt 2, the earlier ones fell short" in line and "lost with" not in line
    assert "on 240 examples, without worker2 (down)" in line
    assert "| 2 of 3 workers up" in line
    row.update(
        workers_lost={"worker1": "killed"}, clients_lost=3, attempts=1, degraded=1, retried=0
    )
    assert "| degraded: 3 of 10 clients lost with worker1, attempt 1" in _round_line(row)


def test_closing_a_worker_while_a_call_on_another_thread_makes_an_executor():
    from coordinator.executor_client import RemoteWorker

    class Racing(RemoteWorker):
        """Each disposal meets a call of another thread making an executor."""

        def _dispose_executor(self, executor, timeout):
            self.disposed.append(executor)
            self._executors[100 + len(self.disposed)] = executor

    worker = Racing("127.0.0.1:1", connect_timeout=1.0)
    worker.disposed = []
    worker._executors = {1: "a", 2: "b"}  # type: ignore[dict-item]
    worker.close()  # no "dictionary changed size during iteration"
    assert worker.disposed == ["a", "b"]
