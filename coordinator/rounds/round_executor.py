"""Training rounds and evaluations of one algorithm over a federation.

`RoundExecutor` samples nothing and decides nothing about the algorithm: it
turns a round's sampled clients into padded client tokens per worker
(`executor_reuse`), runs the composed `next` in its mergeable form across the
workers (`mergeable`), and returns the new state with metrics, timing and
bytes on the wire (`timing`).
"""

from __future__ import annotations

import dataclasses
import time
from concurrent import futures

import numpy as np
from tensorflow_federated.proto.v0 import executor_pb2

from coordinator import algorithm as algorithm_lib
from coordinator.executor_client import PreparedComputation, RemoteWorker, WireStats
from coordinator.executor_client.server import ServerExecutor
from coordinator.federation import Federation
from coordinator.rounds.executor_reuse import EXECUTOR_BUDGET, ExecutorReuse
from coordinator.rounds.mergeable import MergeableRunner
from coordinator.rounds.timing import RoundResult, RoundTiming
from shared import preprocessing


@dataclasses.dataclass
class _KnownState:
    """A state a round returned, with its serialized form, so that the next
    round sends the same bytes instead of serializing it again."""

    value: object
    proto: executor_pb2.Value


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
        self.algorithm = algorithm
        # Empty clients change no example-weighted sum but do change anything
        # that counts clients (an unweighted mean, DP, adaptive clipping or
        # zeroing): pad only when the aggregator has nothing of the kind.
        pad_clients = pad_clients and algorithm.empty_clients_harmless
        self.reuse = [ExecutorReuse(executor_budget, pad_clients) for _ in federation.workers]
        self.federation = federation
        self.server = server
        self._train = MergeableRunner(algorithm.process.next, "train")
        self._eval = MergeableRunner(algorithm.evaluation.next, "eval")
        self._initialize = PreparedComputation(algorithm.process.initialize, "initialize")
        self._eval_initialize = PreparedComputation(
            algorithm.evaluation.initialize, "eval.initialize"
        )
        self._get_weights = PreparedComputation(
            algorithm.process.get_model_weights, "get_model_weights"
        )
        self._eval_set_weights = PreparedComputation(
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

    def _peers(self) -> dict[str, RemoteWorker]:
        peers = {f"worker{i}": w for i, w in enumerate(self.federation.workers)}
        peers["server"] = self.server.worker
        return peers

    def _wire(self) -> dict[str, WireStats]:
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
        """The worker's tokens, padded with empty clients to the count its
        executor-reuse policy runs them at. Empty clients go last: sums over
        the real clients come out bit for bit as without them."""
        target = self.reuse[index].target(len(tokens))
        return tokens + [preprocessing.EMPTY_CLIENT_TOKEN] * (target - len(tokens))

    def _make_room(self, index: int, clients: int) -> None:
        """Frees the worker's executors its policy evicts to make room for `clients`."""
        for count in self.reuse[index].use(clients):
            self.federation.workers[index].dispose_executor(count)

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
            for clients in self.reuse[index].warm_up_counts(clients_per_round, hosted, total):
                if not worker.is_loaded(self._train.after_merge, clients):
                    self._make_room(index, clients)
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
                # Over the clients whose update was finite; none (all dropped): no figure.
                "loss": float(metrics["loss"]) if metrics["num_examples"] else None,
                "accuracy": float(metrics["accuracy"]) if metrics["num_examples"] else None,
                "examples": int(metrics["num_examples"]),
                "clients": sum(len(v) for v in sampled.values()),
                "update_non_finite": int(output.metrics["finalizer"]["update_non_finite"]),
                "dropped_clients": int(metrics["dropped_clients"]),
                "dropped_examples": int(metrics["dropped_examples"]),
                "aggregator": _scalars(output.metrics["aggregator"]),
            },
            timing=timing,
            wire=WireStats.total(by_peer.values()),
            wire_by_peer=by_peer,
        )

    def evaluate(self, state: object, leave_out: frozenset[str] = frozenset()) -> dict:
        """Loss and accuracy of the global model on every writer's test examples
        (but those of the clients in `leave_out`)."""
        weights = self.model_weights(state)
        eval_state = self.server.worker.call(self._eval_initialize, None)
        eval_state = self.server.worker.call(self._eval_set_weights, (eval_state, weights))
        tokens = {
            i: [
                preprocessing.make_token(c, 0)
                for c in self.federation.clients_of(i)
                if c not in leave_out
            ]
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


def _scalars(measurements: object, prefix: str = "") -> dict[str, float]:
    """A block's measurements as flat `name/sub: number` pairs, for the metrics."""
    out: dict[str, float] = {}
    items = measurements.items() if hasattr(measurements, "items") else ()
    for key, value in items:
        name = f"{prefix}{key}"
        if hasattr(value, "items"):
            out.update(_scalars(value, name + "/"))
        elif np.ndim(value) == 0:
            out[name] = float(value)
    return out
