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
"""

from __future__ import annotations

import dataclasses
import time
from concurrent import futures
from typing import TYPE_CHECKING

import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.proto.v0 import executor_pb2

from coordinator.executor_client import CallTiming, PreparedComputation, RemoteWorker, ValueRef
from coordinator.executor_client.computations import element_names
from coordinator.rounds.timing import RoundTiming, WorkerTiming
from shared import preprocessing

if TYPE_CHECKING:
    from coordinator.federation import Federation


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


class MergeableRunner:
    """Runs one mergeable computation over workers, finishing on one of them."""

    def __init__(self, comp: tff.Computation, name: str):
        form = tff.backends.native.compile_to_mergeable_comp_form(comp)
        param = form.up_to_merge.type_signature.parameter
        if not (
            isinstance(param, tff.StructType)
            and len(param) == 2
            and param[0].placement is tff.SERVER  # type: ignore[union-attr]
            and param[1].placement is tff.CLIENTS  # type: ignore[union-attr]
        ):
            raise TypeError(f"{name}: expected (state@SERVER, data@CLIENTS), got {param}")
        member = form.up_to_merge.type_signature.result.member
        partial_type = tff.FederatedType(member, tff.SERVER)

        # `merge` takes and returns unplaced values; placed at the server, it
        # takes the partials where they are and yields what `after_merge` takes.
        @tff.federated_computation(partial_type, partial_type)
        def merge_placed(a, b):
            return tff.federated_map(form.merge, tff.federated_zip((a, b)))

        @tff.tensorflow.computation(member)
        def done_marker(_):
            return tf.constant(True)

        # Fetching a bool that depends on a partial tells when the partial is
        # done without fetching the partial itself.
        @tff.federated_computation(partial_type)
        def partial_done(partial):
            return tff.federated_map(done_marker, partial)

        self.up_to_merge = PreparedComputation(form.up_to_merge, f"{name}.up_to_merge")
        self.merge = PreparedComputation(merge_placed, f"{name}.merge")
        self.after_merge = PreparedComputation(form.after_merge, f"{name}.after_merge")
        self.partial_done = PreparedComputation(partial_done, f"{name}.partial_done")
        self.arg_names = element_names(param)
        self.after_merge_names = element_names(self.after_merge.parameter_type)
        names = element_names(form.after_merge.type_signature.result)
        self.state_index = names.index("state") if "state" in names else None

    def _partial_elsewhere(
        self, worker: RemoteWorker, index: int, arg: executor_pb2.Value, clients: int
    ) -> _Partial:
        started = time.perf_counter()
        call = CallTiming()
        partial = worker.call_proto(self.up_to_merge, arg, clients, call)
        return _Partial(index, partial, None, time.perf_counter() - started, call)

    def _partial_on_finisher(
        self,
        worker: RemoteWorker,
        index: int,
        state: executor_pb2.Value,
        tokens: executor_pb2.Value,
        clients: int,
        keep: list[ValueRef],
    ) -> _Partial:
        """Runs `up_to_merge` on the finisher, keeping its argument and result there.

        Every value made there is added to `keep`, to be disposed of after the round.
        """
        started = time.perf_counter()
        call = CallTiming(new_executor=not worker.is_loaded(self.up_to_merge, clients))
        for comp in (self.up_to_merge, self.partial_done, self.merge, self.after_merge):
            worker.load(comp, clients)
        t1 = time.perf_counter()
        call.setup = t1 - started
        state_ref = worker.create_value(state, clients)
        tokens_ref = worker.create_value(tokens, clients)
        arg_ref = worker.create_struct(
            list(zip(self.arg_names, [state_ref, tokens_ref], strict=True)), clients
        )
        keep += [state_ref, tokens_ref, arg_ref]
        t2 = time.perf_counter()
        call.upload = t2 - t1
        partial_ref = worker.create_call(self.up_to_merge, arg_ref, clients)
        keep.append(partial_ref)
        done_ref = worker.create_call(self.partial_done, partial_ref, clients)
        keep.append(done_ref)
        worker.compute(done_ref, clients)
        call.compute = time.perf_counter() - t2
        return _Partial(index, None, partial_ref, time.perf_counter() - started, call, arg_ref)

    def warm_up(self, worker: RemoteWorker, state: executor_pb2.Value, clients: int) -> None:
        """Builds the worker's executor for `clients` clients and every session the
        finisher's part of a round needs, on empty clients; the result is dropped."""
        tokens = self.up_to_merge.serialize_element(1, [preprocessing.EMPTY_CLIENT_TOKEN] * clients)
        kept: list[ValueRef] = []
        try:
            partial = self._partial_on_finisher(worker, -1, state, tokens, clients, kept)
            assert partial.ref is not None and partial.original_arg is not None
            merged = self._merge_on(worker, partial.ref, partial.ref, clients, kept)
            # No weight at all: the mean is 0/0. Harmless, and never used.
            self._finish_on(worker, partial.original_arg, merged, clients, kept)
        finally:
            worker.dispose(kept, clients)

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
        tokens_by_worker: dict[int, list[str]],
        timing: RoundTiming,
        started: float,
    ) -> executor_pb2.Value:
        """Returns the serialized result of the round."""
        order = [index for index, tokens in sorted(tokens_by_worker.items()) if tokens]
        finisher_index = max(order, key=lambda i: (len(tokens_by_worker[i]), -i))
        finisher = federation.workers[finisher_index]
        clients = len(tokens_by_worker[finisher_index])
        # Values made on the finisher, by its own call's thread and by this one.
        kept_by_call: list[ValueRef] = []
        kept: list[ValueRef] = []
        original_arg: ValueRef | None = None
        pending = []
        for index in order:
            tokens = self.up_to_merge.serialize_element(1, tokens_by_worker[index])
            if index == finisher_index:
                pending.append(
                    pool.submit(
                        self._partial_on_finisher,
                        finisher,
                        index,
                        state_proto,
                        tokens,
                        clients,
                        kept_by_call,
                    )
                )
            else:
                arg = self.up_to_merge.struct_arg([state_proto, tokens])
                worker = federation.workers[index]
                pending.append(
                    pool.submit(
                        self._partial_elsewhere, worker, index, arg, len(tokens_by_worker[index])
                    )
                )
        timing.prepare = time.perf_counter() - started
        try:
            # Partials are merged in worker order, each as soon as all before it
            # are in, so that float sums (and thus whole runs) are reproducible.
            on_finisher: dict[int, ValueRef] = {}
            next_to_merge = 0
            merged: ValueRef | None = None
            for done in futures.as_completed(pending):
                partial: _Partial = done.result()
                now = time.perf_counter()
                tokens = tokens_by_worker[partial.index]
                timing.per_worker[f"worker{partial.index}"] = WorkerTiming(
                    clients=sum(1 for t in tokens if t != preprocessing.EMPTY_CLIENT_TOKEN),
                    padded_to=len(tokens),
                    seconds=partial.seconds,
                    compute=partial.call.compute,
                    upload=partial.call.upload,
                    setup=partial.call.setup,
                    new_executor=partial.call.new_executor,
                )
                if not timing.first_partial:
                    timing.first_partial = now - started
                timing.workers_wall = now - started
                t0 = time.perf_counter()
                if partial.ref is not None:
                    on_finisher[partial.index] = partial.ref
                    original_arg = partial.original_arg
                else:
                    assert partial.proto is not None
                    on_finisher[partial.index] = finisher.create_value(partial.proto, clients)
                    kept.append(on_finisher[partial.index])
                while next_to_merge < len(order) and order[next_to_merge] in on_finisher:
                    ref = on_finisher[order[next_to_merge]]
                    next_to_merge += 1
                    merged = (
                        ref
                        if merged is None
                        else self._merge_on(finisher, merged, ref, clients, kept)
                    )
                timing.merge += time.perf_counter() - t0
            assert merged is not None and original_arg is not None
            t0 = time.perf_counter()
            result = self._finish_on(finisher, original_arg, merged, clients, kept)
            timing.finalize = time.perf_counter() - t0
        except BaseException:
            for p in pending:
                p.cancel()
            raise
        finally:
            finisher.dispose(kept_by_call + kept, clients)
        return result
