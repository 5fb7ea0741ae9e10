"""A mergeable computation run across the workers, finishing on one of them.

The composed `next` is split by TFF's mergeable-form compiler into
`up_to_merge` (client work and partial aggregation), `merge` and
`after_merge` (the finalizer). Each worker runs `up_to_merge` on its own
sampled clients, all workers at once. One of them, the round's *finisher*
(the worker with the most clients, so usually the last to be done), also
merges the partial aggregates, in worker order as they arrive, and runs
`after_merge`; the coordinator fetches only the result.

Why there: moving a model-sized value costs tens of milliseconds per hop on
TFF's gRPC protocol (4.8 MB for the CNN). Merging on the coordinator's own
executor moved every partial twice (worker to coordinator to executor) and
the state twice more; on the finisher, its own partial and the state it
already holds never move, and every other partial moves once.

Large values never become Python objects on the way: the state is serialized
once per round (or not at all, when it is the state the previous round
returned) and the same bytes go to every worker; partials are forwarded as
the workers serialized them.

Workers may fail on the way. One that errs, dies or has not delivered by the
round deadline is dropped and the partials that arrived are merged without
it, in the same worker order. If the finisher is the one lost, another worker
that delivered finishes the round from the partials, which the coordinator
still holds as bytes (the finisher's own partial is lost with it). Whether
what arrived is enough is the caller's rule (`accept`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent import futures
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.proto.v0 import executor_pb2

from coordinator.executor_client import (
    CallTiming,
    PreparedComputation,
    RemoteWorker,
    ValueRef,
    WorkerError,
)
from coordinator.executor_client.computations import element_names
from coordinator.rounds.timing import RoundTiming, WorkerTiming
from shared import pause_points, preprocessing
from shared.errors import FederationError

if TYPE_CHECKING:
    from coordinator.federation import Federation

log = logging.getLogger("fedcompose.coordinator")


@dataclasses.dataclass
class _Partial:
    """A worker's partial aggregate: its bytes, or a reference on the finisher."""

    index: int
    proto: executor_pb2.Value | None
    ref: ValueRef | None
    seconds: float
    call: CallTiming
    original_arg: ValueRef | None = None
    """On the finisher: the `up_to_merge` argument, which `after_merge` takes too."""
    pieces: int = 1
    """Calls the worker's share ran as."""


PARTS = ("up_to_merge", "merge", "after_merge", "partial_done")
"""The prepared computations a `MergeableRunner` runs."""

FUSED_CLIENTS = 1
"""The client count every fused call runs at: its clients are one tensor of
tokens, so the worker keeps one executor whatever the number of clients."""


def compile_parts(comp: tff.Computation, name: str) -> dict[str, PreparedComputation]:
    """`comp` split by TFF's mergeable-form compiler, each part prepared for the
    workers; raises what the compiler raises for a computation it cannot split."""
    return prepare_parts(compile_form(comp, name), name)


def compile_form(comp: tff.Computation, name: str) -> Any:  # tff's MergeableCompForm
    """`comp` split by TFF's mergeable-form compiler (which raises for a
    computation it cannot split)."""
    form = tff.backends.native.compile_to_mergeable_comp_form(comp)
    param = form.up_to_merge.type_signature.parameter
    if not (
        isinstance(param, tff.StructType)
        and len(param) == 2
        and param[0].placement is tff.SERVER
        and param[1].placement is tff.CLIENTS
    ):
        raise TypeError(f"{name}: expected (state@SERVER, data@CLIENTS), got {param}")
    return form


def prepare_parts(form: Any, name: str) -> dict[str, PreparedComputation]:
    """The parts of a mergeable form, prepared for the workers."""
    member = form.up_to_merge.type_signature.result.member
    partial_type = tff.FederatedType(member, tff.SERVER)

    # `merge` takes and returns unplaced values; placed at the server, it
    # takes the partials where they are and yields what `after_merge` takes.
    @tff.federated_computation(partial_type, partial_type)
    def merge_placed(a: tff.Value, b: tff.Value) -> tff.Value:
        return tff.federated_map(form.merge, tff.federated_zip((a, b)))

    @tff.tensorflow.computation(member)
    def done_marker(_: object) -> tf.Tensor:
        return tf.constant(True)

    # Fetching a bool that depends on a partial tells when the partial is
    # done without fetching the partial itself.
    @tff.federated_computation(partial_type)
    def partial_done(partial: tff.Value) -> tff.Value:
        return tff.federated_map(done_marker, partial)

    comps = {
        "up_to_merge": form.up_to_merge,
        "merge": merge_placed,
        "after_merge": form.after_merge,
        "partial_done": partial_done,
    }
    return {part: PreparedComputation(c, f"{name}.{part}") for part, c in comps.items()}


class MergeableRunner:
    """Runs one mergeable computation over workers, finishing on one of them."""

    def __init__(
        self,
        parts: dict[str, PreparedComputation],
        name: str,
        fused: PreparedComputation | None = None,
    ):
        self.name = name
        self.up_to_merge = parts["up_to_merge"]
        self.fused = fused
        """`up_to_merge` as one TensorFlow call over a vector of tokens
        (coordinator/algorithm/fused_share.py), or None: a call per client."""
        self.share = fused or self.up_to_merge
        """What a worker's piece of a share calls."""
        self.merge = parts["merge"]
        self.after_merge = parts["after_merge"]
        self.partial_done = parts["partial_done"]
        self.arg_names = element_names(self.up_to_merge.parameter_type)
        self.share_names = element_names(self.share.parameter_type)
        self.after_merge_names = element_names(self.after_merge.parameter_type)
        names = element_names(self.after_merge.result_type)
        self.state_index = names.index("state") if "state" in names else None

    def count(self, tokens: list[str]) -> int:
        """The client count (executor) a piece of these tokens runs at: a fused
        call holds its tokens in one value, so every piece runs at one count."""
        return FUSED_CLIENTS if self.fused is not None else len(tokens)

    def tokens_value(self, tokens: list[str]) -> executor_pb2.Value:
        """A piece's tokens as the share computation takes them."""
        if self.fused is not None:
            return self.fused.serialize_element(1, np.array(tokens, dtype=object))
        return self.up_to_merge.serialize_element(1, tokens)

    def finish_tokens(self, tokens: list[str]) -> executor_pb2.Value:
        """The clients `after_merge`'s original argument holds. `after_merge`
        computes nothing from them (its result is the state and metrics); a
        fused share runs it at its one client count, with one empty client."""
        if self.fused is not None:
            tokens = [preprocessing.EMPTY_CLIENT_TOKEN] * FUSED_CLIENTS
        return self.up_to_merge.serialize_element(1, tokens)

    def _share(
        self,
        worker: RemoteWorker,
        index: int,
        state: executor_pb2.Value,
        pieces: list[list[str]],
        keep: list[ValueRef] | None = None,
    ) -> _Partial:
        """Runs `up_to_merge` over a worker's share of the clients and merges it
        into one partial aggregate on the worker.

        A share of more clients than fit one call comes as several pieces: they
        run one after another (a call's clients are held in memory at once, so
        this bounds the worker's memory; see `executor_reuse.MemoryPlan`), and
        each piece's partial is merged on the worker as it is done. Pieces run
        at another client count (unpadded shares) run in that count's executor
        and their merged partial moves once into the main one.

        On the finisher (`keep` given), the merged partial and the first piece's
        argument (which `after_merge` takes) stay on the worker, and everything
        made there is added to `keep`; elsewhere the merged partial is fetched
        as bytes and everything made is freed.
        """
        started = time.perf_counter()
        main = self.count(pieces[0])
        call = CallTiming(new_executor=not worker.is_loaded(self.share, main))
        if keep is None and len(pieces) == 1:
            # One call carries state and clients: the cheapest way for most rounds.
            arg = self.share.struct_arg([state, self.tokens_value(pieces[0])])
            proto = worker.call_proto(self.share, arg, main, call)
            return _Partial(index, proto, None, time.perf_counter() - started, call, pieces=1)
        held: list[ValueRef] = keep if keep is not None else []
        comps = self._share_computations(finisher=keep is not None)
        for comp in comps:
            worker.load(comp, main)
        call.setup = time.perf_counter() - started
        try:
            merged, original_arg = self._share_in_pieces(
                worker, state, pieces, held, call, finisher=keep is not None
            )
            if keep is not None:
                return _Partial(
                    index,
                    None,
                    merged,
                    time.perf_counter() - started,
                    call,
                    original_arg,
                    pieces=len(pieces),
                )
            t0 = time.perf_counter()
            proto = worker.compute(merged, main)
            call.compute += time.perf_counter() - t0
            return _Partial(
                index, proto, None, time.perf_counter() - started, call, pieces=len(pieces)
            )
        finally:
            if keep is None:
                worker.dispose(held, main)

    def _share_computations(self, finisher: bool) -> list[PreparedComputation]:
        """What a share run in pieces calls: the finisher also runs `after_merge`."""
        comps = [self.share, self.partial_done, self.merge]
        if finisher:
            comps.append(self.after_merge)
        return comps

    def _share_in_pieces(
        self,
        worker: RemoteWorker,
        state: executor_pb2.Value,
        pieces: list[list[str]],
        held: list[ValueRef],
        call: CallTiming,
        finisher: bool,
    ) -> tuple[ValueRef, ValueRef | None]:
        """Runs a share's pieces, grouped by client count, and merges them into one
        partial in the main count's executor; returns it with the first piece's
        argument when `finisher` (else None). What stays on the worker is in `held`."""
        main = self.count(pieces[0])
        groups: dict[int, list[list[str]]] = {}
        for tokens in pieces:
            groups.setdefault(self.count(tokens), []).append(tokens)
        merged: ValueRef | None = None
        original_arg: ValueRef | None = None
        moved: list[executor_pb2.Value] = []
        for count, group in groups.items():
            bucket = held if count == main else []
            if count != main:
                for comp in self._share_computations(finisher=False):
                    worker.load(comp, count)
            group_merged, first_arg = self._run_group(
                worker, state, group, count, bucket, call, keep_arg=finisher and count == main
            )
            bucket.append(group_merged)
            if count == main:
                merged, original_arg = group_merged, first_arg
            else:
                moved.append(worker.compute(group_merged, count))
                worker.dispose(bucket, count)
        assert merged is not None
        for proto in moved:
            ref = worker.create_value(proto, main)
            held.append(ref)
            merged = self._merge_on(worker, merged, ref, main, held)
        return merged, original_arg

    def _run_group(
        self,
        worker: RemoteWorker,
        state: executor_pb2.Value,
        group: list[list[str]],
        count: int,
        bucket: list[ValueRef],
        call: CallTiming,
        keep_arg: bool,
    ) -> tuple[ValueRef, ValueRef | None]:
        """Runs the pieces of one client count one after another, merging each
        into the group's partial; with `keep_arg`, the first piece's argument
        stays (in `bucket`) and is returned with the partial."""
        t0 = time.perf_counter()
        state_ref = worker.create_value(state, count)
        bucket.append(state_ref)
        call.upload += time.perf_counter() - t0
        group_merged: ValueRef | None = None
        first_arg: ValueRef | None = None
        for tokens in group:
            group_merged, arg_ref = self._run_piece(
                worker,
                state_ref,
                tokens,
                count,
                call,
                group_merged,
                bucket if keep_arg and first_arg is None else None,
            )
            if first_arg is None:
                first_arg = arg_ref
        assert group_merged is not None
        return group_merged, first_arg

    def _run_piece(
        self,
        worker: RemoteWorker,
        state_ref: ValueRef,
        tokens: list[str],
        count: int,
        call: CallTiming,
        group_merged: ValueRef | None,
        keep: list[ValueRef] | None,
    ) -> tuple[ValueRef, ValueRef | None]:
        """Runs `up_to_merge` on one piece, waits for it and merges it into
        `group_merged`; returns the new merged partial, and the piece's argument
        when `keep` is given (it then stays, added to `keep`)."""
        t0 = time.perf_counter()
        tokens_ref = worker.create_value(self.tokens_value(tokens), count)
        arg_ref = worker.create_struct(
            list(zip(self.share_names, [state_ref, tokens_ref], strict=True)), count
        )
        t1 = time.perf_counter()
        call.upload += t1 - t0
        partial_ref = worker.create_call(self.share, arg_ref, count)
        # What this piece made is freed as soon as it is merged: a partial (and
        # a merged one) is model-sized, and keeping every piece's would grow the
        # worker with the number of pieces.
        spent = [tokens_ref, arg_ref]
        kept_arg: ValueRef | None = None
        if keep is not None and self.fused is None:
            kept_arg = arg_ref  # `after_merge` takes it: it stays
            spent = []
            keep += [tokens_ref, arg_ref]
        elif keep is not None:
            clients_ref = worker.create_value(self.finish_tokens(tokens), count)
            kept_arg = worker.create_struct(
                list(zip(self.arg_names, [state_ref, clients_ref], strict=True)), count
            )
            keep += [clients_ref, kept_arg]
        # One piece at a time: wait until this one is done.
        done_ref = worker.create_call(self.partial_done, partial_ref, count)
        worker.compute(done_ref, count)
        spent.append(done_ref)
        if group_merged is None:
            group_merged = partial_ref
        else:
            step: list[ValueRef] = []
            merged_now = self._merge_on(worker, group_merged, partial_ref, count, step)
            settled = worker.create_call(self.partial_done, merged_now, count)
            worker.compute(settled, count)
            spent += [group_merged, partial_ref, settled, *step[:-1]]
            group_merged = merged_now
        worker.dispose(spent, count)
        call.compute += time.perf_counter() - t1
        return group_merged, kept_arg

    def warm_up(self, worker: RemoteWorker, state: executor_pb2.Value, clients: int) -> None:
        """Builds the worker's executor for `clients` clients and every session the
        finisher's part of a round needs, on empty clients; the result is dropped."""
        kept: list[ValueRef] = []
        tokens = [preprocessing.EMPTY_CLIENT_TOKEN] * clients
        count = self.count(tokens)
        try:
            partial = self._share(worker, -1, state, [tokens], kept)
            assert partial.ref is not None and partial.original_arg is not None
            merged = self._merge_on(worker, partial.ref, partial.ref, count, kept)
            # No weight at all: the mean is 0/0. Harmless, and never used.
            self._finish_on(worker, partial.original_arg, merged, count, kept)
        finally:
            worker.dispose(kept, count)

    def _merge_on(
        self,
        worker: RemoteWorker,
        a: ValueRef,
        b: ValueRef,
        clients: int,
        kept: list[ValueRef],
    ) -> ValueRef:
        """Starts `merge(a, b)` on `worker`; what it makes is added to `kept`."""
        pair = worker.create_struct([("", a), ("", b)], clients)
        merged = worker.create_call(self.merge, pair, clients)
        kept += [pair, merged]
        return merged

    def _finish_on(
        self,
        worker: RemoteWorker,
        original_arg: ValueRef,
        merged: ValueRef,
        clients: int,
        kept: list[ValueRef],
    ) -> executor_pb2.Value:
        """Runs `after_merge` on `worker` and fetches the serialized result.

        The finisher's `up_to_merge` argument (state and clients) is the
        original argument `after_merge` wants.
        """
        arg = worker.create_struct(
            list(zip(self.after_merge_names, [original_arg, merged], strict=True)), clients
        )
        result = worker.create_call(self.after_merge, arg, clients)
        kept += [arg, result]
        return worker.compute(result, clients)

    def run(
        self,
        federation: Federation,
        pool: futures.ThreadPoolExecutor,
        state_proto: executor_pb2.Value,
        pieces_by_worker: dict[int, list[list[str]]],
        timing: RoundTiming,
        started: float,
        *,
        phase_timeout: float | None = None,
        accept: Callable[[list[int]], bool] = bool,
        round_num: int = 0,
        track: Callable[[int, futures.Future], None] | None = None,
    ) -> MergeOutcome:
        """Runs the computation on the workers in `pieces_by_worker` (each
        worker's share of the clients as the calls it runs) and returns the
        serialized result, with which workers' partials are in it.

        A worker that fails (an error, killed, unreachable) or has not delivered
        its partial `phase_timeout` seconds after the start is dropped; so is a
        finisher that fails or takes longer than `phase_timeout` to merge and
        finish, and then another worker that delivered finishes the round from
        the partials held as bytes (the lost finisher's own partial is lost with
        it). `accept(delivered)` decides whether the partials that made it are
        enough; if not, `NotEnough` is raised before anything is finished.
        `track(index, future)` is told of each worker's call.
        """
        round_ = _Round(self, federation, pieces_by_worker, timing, started, phase_timeout)
        round_.start(pool, state_proto, track)
        timing.prepare = time.perf_counter() - started
        try:
            round_.collect()
            t0 = time.perf_counter()
            outcome = round_.finish(accept, round_num)
            if outcome is None:
                outcome = self._refinish(
                    federation,
                    state_proto,
                    round_.token_protos,
                    pieces_by_worker,
                    round_.protos,
                    round_.order,
                    round_.lost,
                    accept,
                    phase_timeout,
                )
            timing.finalize = time.perf_counter() - t0
            return outcome
        except BaseException:
            round_.cancel()
            raise
        finally:
            round_.release()

    def _record(
        self,
        timing: RoundTiming,
        partial: _Partial,
        tokens_by_worker: dict[int, list[str]],
        started: float,
    ) -> None:
        now = time.perf_counter()
        tokens = tokens_by_worker[partial.index]
        timing.per_worker[f"worker{partial.index}"] = WorkerTiming(
            clients=sum(1 for t in tokens if t != preprocessing.EMPTY_CLIENT_TOKEN),
            padded_to=len(tokens),
            pieces=partial.pieces,
            seconds=partial.seconds,
            compute=partial.call.compute,
            upload=partial.call.upload,
            setup=partial.call.setup,
            new_executor=partial.call.new_executor,
        )
        if not timing.first_partial:
            timing.first_partial = now - started
        timing.workers_wall = now - started

    def _refinish(
        self,
        federation: Federation,
        state_proto: executor_pb2.Value,
        token_protos: dict[int, executor_pb2.Value],
        pieces_by_worker: dict[int, list[list[str]]],
        protos: dict[int, executor_pb2.Value],
        order: list[int],
        lost: dict[int, str],
        accept: Callable[[list[int]], bool],
        phase_timeout: float | None,
    ) -> MergeOutcome:
        """Finishes the round on another worker that delivered, after the finisher
        was lost: from the other partials, held as the bytes the workers sent."""
        while True:
            delivered = [i for i in order if i in protos and i not in lost]
            if not delivered or not accept(delivered):
                raise NotEnough(delivered, lost)
            sizes = {i: [t for p in ps for t in p] for i, ps in pieces_by_worker.items()}
            index = _busiest(delivered, sizes)
            worker = federation.workers[index]
            clients = self.count(pieces_by_worker[index][0])
            log.warning(
                "the round's finisher was lost; finishing on worker %s from %d partials",
                worker.label,
                len(delivered),
            )
            kept: list[ValueRef] = []
            try:
                by = None if phase_timeout is None else time.monotonic() + phase_timeout
                with (
                    worker.deadline(by, _within(phase_timeout, "to finish"))
                    if by is not None
                    else contextlib.nullcontext()
                ):
                    state_ref = worker.create_value(state_proto, clients)
                    tokens_ref = worker.create_value(token_protos[index], clients)
                    arg_ref = worker.create_struct(
                        list(zip(self.arg_names, [state_ref, tokens_ref], strict=True)), clients
                    )
                    kept += [state_ref, tokens_ref, arg_ref]
                    merged: ValueRef | None = None
                    for i in delivered:
                        ref = worker.create_value(protos[i], clients)
                        kept.append(ref)
                        merged = (
                            ref
                            if merged is None
                            else self._merge_on(worker, merged, ref, clients, kept)
                        )
                    assert merged is not None
                    result = self._finish_on(worker, arg_ref, merged, clients, kept)
                worker.dispose(kept, clients)
                return MergeOutcome(result, delivered, lost, index, refinished=True)
            except WorkerError as e:
                lost[index] = f"{e} (while finishing the round in place of the lost finisher)"


class _Round:
    """One run of a mergeable computation: the workers' calls in flight, the
    partials they delivered, the workers lost, and the finisher's merge."""

    def __init__(
        self,
        runner: MergeableRunner,
        federation: Federation,
        pieces_by_worker: dict[int, list[list[str]]],
        timing: RoundTiming,
        started: float,
        phase_timeout: float | None,
    ):
        self.runner, self.federation = runner, federation
        self.pieces_by_worker = pieces_by_worker
        self.timing, self.started, self.phase_timeout = timing, started, phase_timeout
        self.tokens_by_worker = {
            i: [t for p in ps for t in p] for i, ps in pieces_by_worker.items()
        }
        self.order = [i for i, tokens in sorted(self.tokens_by_worker.items()) if tokens]
        self.finisher_index = _busiest(self.order, self.tokens_by_worker)
        self.finisher = federation.workers[self.finisher_index]
        self.clients = runner.count(pieces_by_worker[self.finisher_index][0])
        self.deadline = None if phase_timeout is None else time.monotonic() + phase_timeout
        self.merge_by = self.deadline
        """Until when a merge step on the finisher may run: the delivery deadline,
        then (for the merges left and `after_merge`) as long again."""
        # Values made on the finisher, by its own call's thread and by this one.
        self.kept_by_call: list[ValueRef] = []
        self.kept: list[ValueRef] = []
        self.lost: dict[int, str] = {}
        self.protos: dict[int, executor_pb2.Value] = {}
        self.token_protos: dict[int, executor_pb2.Value] = {}
        self.original_arg: ValueRef | None = None
        self.merger = _Merger(runner, self.finisher, self.clients, self.order, self.kept)
        self.finisher_ok = True
        self.pending: dict[futures.Future, int] = {}

    def start(
        self,
        pool: futures.ThreadPoolExecutor,
        state_proto: executor_pb2.Value,
        track: Callable[[int, futures.Future], None] | None,
    ) -> None:
        """Starts every worker's share, all at once."""
        for index in self.order:
            pieces = self.pieces_by_worker[index]
            # What another worker needs to finish the round in this one's place.
            self.token_protos[index] = self.runner.finish_tokens(pieces[0])
            if index == self.finisher_index:
                future = pool.submit(
                    self.runner._share, self.finisher, index, state_proto, pieces, self.kept_by_call
                )
            else:
                worker = self.federation.workers[index]
                future = pool.submit(self.runner._share, worker, index, state_proto, pieces)
            self.pending[future] = index
            if track is not None:
                track(index, future)

    def collect(self) -> None:
        """Takes in the partials until all are in or lost, or the deadline passed;
        then drops the workers that missed it."""
        # Partials are merged in worker order, each as soon as all before it are
        # in or lost, so that float sums (and thus whole runs) are reproducible
        # for a given set of delivered partials.
        waiting = set(self.pending)
        while waiting:
            left = None if self.deadline is None else self.deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            done, waiting = futures.wait(waiting, timeout=left, return_when=futures.FIRST_COMPLETED)
            for future in sorted(done, key=lambda f: self.pending[f]):
                self._harvest(future)
        # Delivery is over. The merges left and `after_merge` get as long again:
        # a merge step run on the expired deadline failed at once, losing a
        # healthy finisher (and its partial) whenever a partial after a missing
        # one in worker order waited to be merged.
        if self.phase_timeout is not None:
            self.merge_by = time.monotonic() + self.phase_timeout
        # Calls that ended while this thread was held (by a merge step on a stuck
        # finisher, until the deadline) delivered in time; only those still
        # running missed it.
        for future in sorted((f for f in waiting if f.done()), key=lambda f: self.pending[f]):
            waiting.discard(future)
            self._harvest(future)
        for future in waiting:
            missed = _within(self.phase_timeout, "to deliver its partial", missed=True)
            self._lose(self.pending[future], missed)

    def finish(self, accept: Callable[[list[int]], bool], round_num: int) -> MergeOutcome | None:
        """Runs `after_merge` on the finisher; None when the finisher is (or gets)
        lost, for another worker to finish the round."""
        if not self.finisher_ok:
            return None
        assert self.merger.done() and self.original_arg is not None
        if not accept(self.merger.merged):
            raise NotEnough(self.merger.merged, self.lost)
        pause_points.reached("merged", round_num, finisher=self.finisher.address)
        try:
            with self._on_time("to finish"):
                result = self.runner._finish_on(
                    self.finisher, self.original_arg, self.merger.value, self.clients, self.kept
                )
        except WorkerError as e:
            self.finisher_ok = False
            self.lost[self.finisher_index] = f"{e} (as the round's finisher, while finishing it)"
            return None
        return MergeOutcome(result, self.merger.merged, self.lost, self.finisher_index)

    def cancel(self) -> None:
        for future in self.pending:
            future.cancel()

    def release(self) -> None:
        """Frees what the round made on the finisher (a lost one is left alone)."""
        if self.finisher_ok:
            self.finisher.dispose(self.kept_by_call + self.kept, self.clients)

    def _on_time(self, what: str) -> contextlib.AbstractContextManager:
        """Bounds the finisher's calls by `merge_by`."""
        if self.merge_by is None:
            return contextlib.nullcontext()
        return self.finisher.deadline(self.merge_by, _within(self.phase_timeout, what))

    def _on_finisher(self, step: Callable[[], None]) -> None:
        """Runs a merge step on the finisher, within `merge_by`; a finisher that
        fails it is lost, with every partial forwarded to it."""
        if not self.finisher_ok:
            return
        try:
            with self._on_time("to merge"):
                step()
        except WorkerError as e:
            self.finisher_ok = False
            self.lost[self.finisher_index] = f"{e} (while merging, as the round's finisher)"

    def _lose(self, index: int, why: str) -> None:
        self.lost[index] = why
        if index == self.finisher_index:
            self.finisher_ok = False
        self._on_finisher(lambda: self.merger.skip(index))

    def _harvest(self, future: futures.Future) -> None:
        """Takes in a worker's finished call: its partial, or its loss."""
        index = self.pending[future]
        try:
            partial: _Partial = future.result()
        except WorkerError as e:
            self._lose(index, str(e))
            return
        self.runner._record(self.timing, partial, self.tokens_by_worker, self.started)
        t0 = time.perf_counter()
        if partial.ref is not None:
            self.original_arg = partial.original_arg
            ref = partial.ref
            self._on_finisher(lambda: self.merger.add_ref(index, ref))
        else:
            proto = partial.proto
            assert proto is not None
            self.protos[index] = proto
            self._on_finisher(lambda: self.merger.add_proto(index, proto))
        self.timing.merge += time.perf_counter() - t0


def _busiest(indices: list[int], tokens_by_worker: dict[int, list[str]]) -> int:
    """The worker with the most clients (the lowest index among equals): the
    last one likely done, so its partial need not move."""
    return max(indices, key=lambda i: (len(tokens_by_worker[i]), -i))


def _within(seconds: float | None, what: str, missed: bool = False) -> str:
    limit = f"the {seconds:g}s round deadline" if seconds is not None else "its deadline"
    if missed:
        return f"not done within {limit} {what}; dropped from the round"
    return f"within {limit} {what}"


@dataclasses.dataclass
class MergeOutcome:
    """A finished mergeable computation, and which workers' partials are in it."""

    result: executor_pb2.Value
    delivered: list[int]
    """Workers whose partials were merged, in merge (worker) order."""
    lost: dict[int, str]
    """Workers dropped on the way, with why."""
    finisher: int
    refinished: bool = False
    """The first finisher was lost; another worker finished the round."""


class NotEnough(FederationError):
    """The partials that made it are not enough to finish the round."""

    def __init__(self, delivered: list[int], lost: dict[int, str]):
        self.delivered = delivered
        self.lost = lost
        reasons = "; ".join(lost.values()) or "no partial"
        super().__init__(f"only {len(delivered)} workers delivered ({reasons})")


class _Merger:
    """Merges partials on one worker in a fixed order, each as soon as all
    before it are in or known to be lost."""

    def __init__(
        self,
        runner: MergeableRunner,
        worker: RemoteWorker,
        clients: int,
        order: list[int],
        kept: list[ValueRef],
    ):
        self.runner, self.worker, self.clients = runner, worker, clients
        self.order = order
        self.kept = kept
        self.refs: dict[int, ValueRef] = {}
        self.skipped: set[int] = set()
        self.position = 0
        self.value: ValueRef | None = None
        self.merged: list[int] = []

    def add_ref(self, index: int, ref: ValueRef) -> None:
        self.refs[index] = ref
        self._advance()

    def add_proto(self, index: int, proto: executor_pb2.Value) -> None:
        ref = self.worker.create_value(proto, self.clients)
        self.kept.append(ref)
        self.refs[index] = ref
        self._advance()

    def skip(self, index: int) -> None:
        self.skipped.add(index)
        self._advance()

    def done(self) -> bool:
        return self.position == len(self.order)

    def _advance(self) -> None:
        while self.position < len(self.order):
            index = self.order[self.position]
            if index in self.skipped:
                self.position += 1
                continue
            ref = self.refs.get(index)
            if ref is None:
                return
            self.position += 1
            self.value = (
                ref
                if self.value is None
                else self.runner._merge_on(self.worker, self.value, ref, self.clients, self.kept)
            )
            self.merged.append(index)
