"""One training round (and one evaluation) spread across the workers.

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

A worker builds a new executor (TensorFlow sessions for every computation)
for each number of clients it is sent, which costs tens to hundreds of
milliseconds; sampling gives a worker a different number almost every round.
So each worker's clients are padded with empty clients up to one of a few
counts (at most a quarter more), and the executors for those are reused; and
the first round with a new number of clients per round first builds, on every
worker, the executors for the counts that sampling will likely give it, by
running the round's computations once on empty clients only.
"""

from __future__ import annotations

import dataclasses
import math
import time
from concurrent import futures

import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.proto.v0 import executor_pb2

from coordinator import algorithm as algorithm_lib
from coordinator import remote
from coordinator.federation import Federation
from coordinator.server import ServerExecutor
from shared import preprocessing

EXECUTOR_BUDGET = 256
"""Clients a worker's kept executors may serve in all. An executor holds its
clients' TensorFlow state (about 16 MB per client for the CNN, measured with
`fedcompose bench`); without a bound, executors kept for reuse ran four CNN
workers at 1,000 clients per round out of memory on a 24 GiB machine."""


def padded_count(clients: int) -> int:
    """The client count a worker runs `clients` clients at.

    Exact up to 8; above, rounded up to one of four steps per power of two
    (10, 12, 14, 16, 20, 24, ...), so at most 25% of the clients are empty ones.
    """
    if clients <= 8:
        return clients
    step = 1 << (clients.bit_length() - 3)
    return -(-clients // step) * step


def likely_counts(clients_per_round: int, hosted: int, total: int, spread: float = 3.0) -> range:
    """Client counts a worker hosting `hosted` of `total` clients will likely get.

    Sampling `clients_per_round` without replacement gives a worker a
    hypergeometric count; this is its mean plus or minus `spread` standard
    deviations, within what is possible.
    """
    share = hosted / total
    mean = clients_per_round * share
    variance = mean * (1 - share) * (total - clients_per_round) / max(1, total - 1)
    margin = spread * math.sqrt(max(0.0, variance))
    low = max(0, math.floor(mean - margin))
    high = min(hosted, clients_per_round, math.ceil(mean + margin))
    return range(max(1, low), high + 1)


@dataclasses.dataclass
class WorkerTiming:
    clients: int
    """Sampled clients, without the empty ones added as padding."""
    seconds: float
    """From dispatch until this worker's partial aggregate was done."""
    compute: float = 0.0
    """Starting the call until its partial was done: the worker's own work."""
    upload: float = 0.0
    """Sending the state and the client tokens."""
    setup: float = 0.0
    """Making an executor and loading the computation (first call per client count)."""
    new_executor: bool = False
    padded_to: int = 0
    """The client count the worker ran, empty clients included."""


@dataclasses.dataclass
class RoundTiming:
    total: float = 0.0
    prepare: float = 0.0
    """Tokens and serialized state, before anything is sent."""
    first_partial: float = 0.0
    """From the start until the first worker's partial aggregate was done."""
    workers_wall: float = 0.0
    """From the start until the last worker's partial aggregate was done."""
    merge: float = 0.0
    """Forwarding partials to the finisher and starting the merges there."""
    finalize: float = 0.0
    """From the last partial until the round's result was in: the merges still
    pending, `after_merge` and fetching its result."""
    per_worker: dict[str, WorkerTiming] = dataclasses.field(default_factory=dict)
    warm_up: float = 0.0
    """Building executors ahead, in the first round with a new number of clients."""

    @property
    def coordinator(self) -> float:
        """Time spent outside waiting on workers (merge, finalizer, bookkeeping)."""
        return max(0.0, self.total - self.warm_up - self.workers_wall)

    @property
    def worker_compute(self) -> float:
        """The slowest worker's compute time, which bounds the round."""
        return max((t.compute for t in self.per_worker.values()), default=0.0)

    @property
    def waiting(self) -> float:
        """Waiting on workers beyond their compute: transfers, set-up, imbalance."""
        return max(0.0, self.workers_wall - self.worker_compute)


@dataclasses.dataclass
class RoundResult:
    state: object
    metrics: dict
    timing: RoundTiming
    wire: remote.WireStats
    wire_by_peer: dict[str, remote.WireStats] = dataclasses.field(default_factory=dict)
    """Bytes per worker label, and for the coordinator's own server executor."""


@dataclasses.dataclass
class _KnownState:
    """A state a round returned, with its serialized form, so that the next
    round sends the same bytes instead of serializing it again."""

    value: object
    proto: executor_pb2.Value


@dataclasses.dataclass
class _Partial:
    """A worker's partial aggregate: its bytes, or a reference on the finisher."""

    index: int
    proto: executor_pb2.Value | None
    ref: remote.ValueRef | None
    seconds: float
    call: remote.CallTiming
    original_arg: remote.ValueRef | None = None
    """On the finisher: the `up_to_merge` argument, which `after_merge` takes too."""


class _MergeableRunner:
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

        self.up_to_merge = remote.PreparedComputation(form.up_to_merge, f"{name}.up_to_merge")
        self.merge = remote.PreparedComputation(merge_placed, f"{name}.merge")
        self.after_merge = remote.PreparedComputation(form.after_merge, f"{name}.after_merge")
        self.partial_done = remote.PreparedComputation(partial_done, f"{name}.partial_done")
        self.arg_names = remote.element_names(param)
        self.after_merge_names = remote.element_names(self.after_merge.parameter_type)
        names = remote.element_names(form.after_merge.type_signature.result)
        self.state_index = names.index("state") if "state" in names else None

    def _partial_elsewhere(
        self, worker: remote.RemoteWorker, index: int, arg: executor_pb2.Value, clients: int
    ) -> _Partial:
        started = time.perf_counter()
        call = remote.CallTiming()
        partial = worker.call_proto(self.up_to_merge, arg, clients, call)
        return _Partial(index, partial, None, time.perf_counter() - started, call)

    def _partial_on_finisher(
        self,
        worker: remote.RemoteWorker,
        index: int,
        state: executor_pb2.Value,
        tokens: executor_pb2.Value,
        clients: int,
        keep: list[remote.ValueRef],
    ) -> _Partial:
        """Runs `up_to_merge` on the finisher, keeping its argument and result there.

        Every value made there is added to `keep`, to be disposed of after the round.
        """
        started = time.perf_counter()
        call = remote.CallTiming(new_executor=not worker.is_loaded(self.up_to_merge, clients))
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

    def warm_up(self, worker: remote.RemoteWorker, state: executor_pb2.Value, clients: int) -> None:
        """Builds the worker's executor for `clients` clients and every session the
        finisher's part of a round needs, on empty clients; the result is dropped."""
        tokens = self.up_to_merge.serialize_element(1, [preprocessing.EMPTY_CLIENT_TOKEN] * clients)
        kept: list[remote.ValueRef] = []
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
        worker: remote.RemoteWorker,
        a: remote.ValueRef,
        b: remote.ValueRef,
        clients: int,
        kept: list[remote.ValueRef],
    ) -> remote.ValueRef:
        """Starts `merge(a, b)` on `worker`; what it makes is added to `kept`."""
        pair = worker.create_struct([("", a), ("", b)], clients)
        merged = worker.create_call(self.merge, pair, clients)
        kept += [pair, merged]
        return merged

    def _finish_on(
        self,
        worker: remote.RemoteWorker,
        original_arg: remote.ValueRef,
        merged: remote.ValueRef,
        clients: int,
        kept: list[remote.ValueRef],
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
        kept_by_call: list[remote.ValueRef] = []
        kept: list[remote.ValueRef] = []
        original_arg: remote.ValueRef | None = None
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
            on_finisher: dict[int, remote.ValueRef] = {}
            next_to_merge = 0
            merged: remote.ValueRef | None = None
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


class RoundExecutor:
    """Drives training rounds and evaluations of one algorithm over a federation."""

    def __init__(
        self,
        algorithm: algorithm_lib.Algorithm,
        federation: Federation,
        server: ServerExecutor,
        pad_clients: bool = True,
        executor_budget: int = EXECUTOR_BUDGET,
    ):
        self.executor_budget = executor_budget
        self.algorithm = algorithm
        self.pad_clients = pad_clients
        self.federation = federation
        self.server = server
        self._train = _MergeableRunner(algorithm.process.next, "train")
        self._eval = _MergeableRunner(algorithm.evaluation.next, "eval")
        self._initialize = remote.PreparedComputation(algorithm.process.initialize, "initialize")
        self._eval_initialize = remote.PreparedComputation(
            algorithm.evaluation.initialize, "eval.initialize"
        )
        self._get_weights = remote.PreparedComputation(
            algorithm.process.get_model_weights, "get_model_weights"
        )
        self._eval_set_weights = remote.PreparedComputation(
            algorithm.evaluation.set_model_weights, "eval.set_model_weights"
        )
        self._pool = futures.ThreadPoolExecutor(
            max(1, len(federation.workers)), thread_name_prefix="worker-call"
        )
        self._known: _KnownState | None = None
        self._warmed_for: set[int] = set()

    def close(self) -> None:
        self._known = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _peers(self) -> dict[str, remote.RemoteWorker]:
        peers = {f"worker{i}": w for i, w in enumerate(self.federation.workers)}
        peers["server"] = self.server.worker
        return peers

    def _wire(self) -> dict[str, remote.WireStats]:
        return {label: w.stats.snapshot() for label, w in self._peers().items()}

    def initialize(self) -> object:
        return self.server.worker.call(self._initialize, None)

    def model_weights(self, state: object) -> object:
        return self.server.worker.call(self._get_weights, state)

    def _state_proto(self, state: object) -> executor_pb2.Value:
        known = self._known
        # Identity, not equality: the state the last round returned, handed
        # back unchanged, as the trainer does. States are never mutated in place.
        if known is not None and known.value is state:
            return known.proto
        self._known = None
        return self._train.up_to_merge.serialize_element(0, state)

    def _padded(self, index: int, tokens: list[str]) -> list[str]:
        """The worker's tokens, padded to the smallest count it has an executor for
        (or will keep one for), but never beyond `padded_count`."""
        if not self.pad_clients or not tokens:
            return tokens
        limit = padded_count(len(tokens))
        known = self.federation.workers[index].client_counts()
        target = min((c for c in known if len(tokens) <= c <= limit), default=limit)
        # Empty clients go last: sums over the real clients come out bit for bit
        # as without them (adding zeros changes no float).
        return tokens + [preprocessing.EMPTY_CLIENT_TOKEN] * (target - len(tokens))

    def _make_room(self, index: int, clients: int) -> None:
        """Frees the worker's least recently used executors so that, with the one
        for `clients`, they serve at most `executor_budget` clients."""
        if not clients:
            return
        worker = self.federation.workers[index]
        kept = self.executor_budget - (0 if clients in worker.client_counts() else clients)
        worker.release_executors(keep=clients, budget=max(0, kept))

    def warm_up(self, state_proto: executor_pb2.Value, clients_per_round: int) -> None:
        """Builds, on every worker at once, the executors for the (padded) client
        counts that sampling `clients_per_round` clients will likely give it.

        Each costs the worker tens to hundreds of milliseconds once, instead of
        in some round later on; a round that still meets a new count builds its
        executor then, as without warm-up.
        """
        total = self.federation.num_clients

        def warm(index: int) -> None:
            worker = self.federation.workers[index]
            hosted = len(self.federation.descriptions[index].manifest.clients)
            likely = likely_counts(clients_per_round, hosted, total)
            counts = {padded_count(n) for n in likely} if self.pad_clients else set(likely)
            mean = clients_per_round * hosted / total
            # The likeliest counts first, as many as the budget holds.
            budget = self.executor_budget
            for clients in sorted(counts, key=lambda c: (abs(c - mean), c)):
                if clients > budget:
                    break
                budget -= clients
                if not worker.is_loaded(self._train.after_merge, clients):
                    self._train.warm_up(worker, state_proto, clients)

        list(self._pool.map(warm, range(len(self.federation.workers))))

    def train_round(
        self, state: object, sampled: dict[int, list[str]], shuffle_seed: int
    ) -> RoundResult:
        wire_before = self._wire()
        timing = RoundTiming()
        started = time.perf_counter()
        state_proto = self._state_proto(state)
        clients_per_round = sum(len(ids) for ids in sampled.values())
        if clients_per_round not in self._warmed_for:
            self._warmed_for.add(clients_per_round)
            t0 = time.perf_counter()
            self.warm_up(state_proto, clients_per_round)
            timing.warm_up = time.perf_counter() - t0
        run_started = time.perf_counter()
        tokens = {
            i: self._padded(i, [preprocessing.make_token(c, shuffle_seed) for c in ids])
            for i, ids in sampled.items()
        }
        for i, worker_tokens in tokens.items():
            self._make_room(i, len(worker_tokens))
        result_proto = self._train.run(
            self.federation, self._pool, state_proto, tokens, timing, run_started
        )
        output = self._train.after_merge.deserialize_result(result_proto)
        index = self._train.state_index
        self._known = (
            _KnownState(output.state, result_proto.struct.element[index].value)
            if index is not None
            else None
        )
        timing.total = time.perf_counter() - started
        metrics = output.metrics["client_work"]["train"]
        wire_after = self._wire()
        by_peer = {label: wire_after[label].since(wire_before[label]) for label in wire_after}
        return RoundResult(
            state=output.state,
            metrics={
                "loss": float(metrics["loss"]),
                "accuracy": float(metrics["accuracy"]),
                "examples": int(metrics["num_examples"]),
                "clients": sum(len(v) for v in sampled.values()),
                "update_non_finite": int(output.metrics["finalizer"]["update_non_finite"]),
            },
            timing=timing,
            wire=remote.WireStats.total(by_peer.values()),
            wire_by_peer=by_peer,
        )

    def evaluate(self, state: object) -> dict:
        """Loss and accuracy of the global model on every writer's test examples."""
        weights = self.model_weights(state)
        eval_state = self.server.worker.call(self._eval_initialize, None)
        eval_state = self.server.worker.call(self._eval_set_weights, (eval_state, weights))
        tokens = {
            i: [preprocessing.make_token(c, 0) for c in self.federation.clients_of(i)]
            for i in range(len(self.federation.workers))
        }
        for i, worker_tokens in tokens.items():
            self._make_room(i, len(worker_tokens))
        timing = RoundTiming()
        started = time.perf_counter()
        result_proto = self._eval.run(
            self.federation,
            self._pool,
            self._eval.up_to_merge.serialize_element(0, eval_state),
            tokens,
            timing,
            started,
        )
        output = self._eval.after_merge.deserialize_result(result_proto)
        metrics = output.metrics["client_work"]["eval"]["current_round_metrics"]
        return {
            "loss": float(metrics["loss"]),
            "accuracy": float(metrics["sparse_categorical_accuracy"]),
            "examples": int(metrics["num_examples"]),
            "seconds": time.perf_counter() - started,
        }
