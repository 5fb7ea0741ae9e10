"""One training round (and one evaluation) spread across the workers.

The composed `next` is split by TFF's mergeable-form compiler into
`up_to_merge` (client work and partial aggregation), `merge` and
`after_merge` (the finalizer). Each worker runs `up_to_merge` on its own
sampled clients, all workers at once; the coordinator merges the partial
aggregates on its server executor as they arrive and finishes the round there.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent import futures

import tensorflow_federated as tff

from coordinator import algorithm as algorithm_lib
from coordinator import remote
from coordinator.federation import Federation
from coordinator.server import ServerExecutor
from shared import preprocessing


@dataclasses.dataclass
class WorkerTiming:
    clients: int
    seconds: float


@dataclasses.dataclass
class RoundTiming:
    total: float = 0.0
    workers_wall: float = 0.0
    """From dispatch until the last worker's partial aggregate arrived."""
    merge: float = 0.0
    finalize: float = 0.0
    per_worker: dict[str, WorkerTiming] = dataclasses.field(default_factory=dict)

    @property
    def coordinator(self) -> float:
        """Time spent outside waiting on workers (merge, finalizer, bookkeeping)."""
        return max(0.0, self.total - self.workers_wall)


@dataclasses.dataclass
class RoundResult:
    state: object
    metrics: dict
    timing: RoundTiming
    wire: remote.WireStats


class _MergeableRunner:
    """Runs one mergeable computation over workers, merging on the server."""

    def __init__(self, comp: tff.Computation, name: str):
        form = tff.backends.native.compile_to_mergeable_comp_form(comp)
        self.up_to_merge = remote.PreparedComputation(form.up_to_merge, f"{name}.up_to_merge")
        self.merge = remote.PreparedComputation(form.merge, f"{name}.merge")
        self.after_merge = remote.PreparedComputation(form.after_merge, f"{name}.after_merge")

    def run(
        self,
        federation: Federation,
        server: ServerExecutor,
        pool: futures.ThreadPoolExecutor,
        state: object,
        tokens_by_worker: dict[int, list[str]],
        timing: RoundTiming,
    ) -> object:
        started = time.perf_counter()

        def on_worker(index: int, tokens: list[str]):
            t0 = time.perf_counter()
            partial = federation.workers[index].call(self.up_to_merge, (state, tokens), len(tokens))
            return index, partial, time.perf_counter() - t0

        pending = [
            pool.submit(on_worker, index, tokens)
            for index, tokens in sorted(tokens_by_worker.items())
            if tokens
        ]
        # Partials are merged in worker order, each as soon as all before it are
        # in, so that float sums (and thus whole runs) are reproducible.
        arrived: dict[int, object] = {}
        order = [index for index, tokens in sorted(tokens_by_worker.items()) if tokens]
        next_to_merge = 0
        merged = None
        try:
            for done in futures.as_completed(pending):
                index, partial, seconds = done.result()
                timing.per_worker[f"worker{index}"] = WorkerTiming(
                    len(tokens_by_worker[index]), seconds
                )
                timing.workers_wall = time.perf_counter() - started
                arrived[index] = partial
                while next_to_merge < len(order) and order[next_to_merge] in arrived:
                    partial = arrived.pop(order[next_to_merge])
                    next_to_merge += 1
                    t0 = time.perf_counter()
                    merged = (
                        partial
                        if merged is None
                        else server.worker.call(self.merge, (merged, partial))
                    )
                    timing.merge += time.perf_counter() - t0
        except BaseException:
            for p in pending:
                p.cancel()
            raise
        t0 = time.perf_counter()
        # after_merge only uses server-placed values, so clients get an empty list.
        result = server.worker.call(self.after_merge, ((state, []), merged), 0)
        timing.finalize = time.perf_counter() - t0
        return result


class RoundExecutor:
    """Drives training rounds and evaluations of one algorithm over a federation."""

    def __init__(
        self, algorithm: algorithm_lib.Algorithm, federation: Federation, server: ServerExecutor
    ):
        self.algorithm = algorithm
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

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _wire(self) -> remote.WireStats:
        total = remote.WireStats()
        for w in [*self.federation.workers, self.server.worker]:
            total.bytes_sent += w.stats.bytes_sent
            total.bytes_received += w.stats.bytes_received
            total.calls += w.stats.calls
        return total

    def initialize(self) -> object:
        return self.server.worker.call(self._initialize, None)

    def model_weights(self, state: object) -> object:
        return self.server.worker.call(self._get_weights, state)

    def train_round(
        self, state: object, sampled: dict[int, list[str]], shuffle_seed: int
    ) -> RoundResult:
        wire_before = self._wire().snapshot()
        timing = RoundTiming()
        started = time.perf_counter()
        tokens = {
            i: [preprocessing.make_token(c, shuffle_seed) for c in ids]
            for i, ids in sampled.items()
        }
        output = self._train.run(self.federation, self.server, self._pool, state, tokens, timing)
        timing.total = time.perf_counter() - started
        metrics = output.metrics["client_work"]["train"]
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
            wire=self._wire().since(wire_before),
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
        timing = RoundTiming()
        started = time.perf_counter()
        output = self._eval.run(
            self.federation, self.server, self._pool, eval_state, tokens, timing
        )
        metrics = output.metrics["client_work"]["eval"]["current_round_metrics"]
        return {
            "loss": float(metrics["loss"]),
            "accuracy": float(metrics["sparse_categorical_accuracy"]),
            "examples": int(metrics["num_examples"]),
            "seconds": time.perf_counter() - started,
        }
