"""One federation being driven: the lifecycle `train`, `run` and the benchmark share.

Entering a session starts the coordinator's server executor (which also
becomes TFF's default context in this process, so TFF never starts an
unsupervised executor of its own), connects to every worker and checks that
they form one federation. `round_executor(spec)` composes the algorithm and
returns what drives its rounds. Leaving the session, however it is left,
closes every round executor, the worker channels and the server executor.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator import algorithm as algorithm_lib
from coordinator import federation as federation_lib
from coordinator.executor_client.connection import ClientTLS
from coordinator.executor_client.server import ServerExecutor
from coordinator.rounds import prepared
from coordinator.rounds.executor_reuse import MemoryPlan
from coordinator.rounds.round_executor import RoundExecutor
from shared.errors import UsageError, one_line

if TYPE_CHECKING:
    from coordinator.algorithm.user_process import UserAlgorithm

log = logging.getLogger("fedcompose.coordinator")


class FederationSession:
    def __init__(
        self,
        addresses: Sequence[str],
        *,
        rpc_timeout: float,
        connect_timeout: float,
        log_dir: Path | None = None,
        tls: ClientTLS | None = None,
    ):
        self.addresses = list(addresses)
        self.rpc_timeout = rpc_timeout
        self.connect_timeout = connect_timeout
        self.log_dir = log_dir
        self.tls = tls
        self.server: ServerExecutor | None = None
        self.federation: federation_lib.Federation | None = None
        self._executors: list[RoundExecutor] = []

    def __enter__(self) -> FederationSession:
        try:
            self.server = ServerExecutor.start(
                rpc_timeout=self.rpc_timeout,
                log_path=self.log_dir / "server-executor.log" if self.log_dir else None,
            )
            self.server.install_as_default_context()
            self.federation = federation_lib.connect(
                self.addresses,
                rpc_timeout=self.rpc_timeout,
                connect_timeout=self.connect_timeout,
                tls=self.tls,
            )
        except BaseException:
            self.close()
            raise
        f = self.federation
        log.info(
            "federation: %d workers, %d clients, %d train / %d test examples, task %s",
            len(f.workers),
            f.num_clients,
            sum(d.manifest.train_examples for d in f.descriptions),
            sum(d.manifest.test_examples for d in f.descriptions),
            f.task.describe(),
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def round_executor(
        self, spec: algorithm_lib.AlgorithmSpec, worker_memory_mb: int = 0, fused: bool = True
    ) -> RoundExecutor:
        """The composed algorithm for `spec`, ready to drive rounds on this
        federation, each worker's calls sized to `worker_memory_mb` (0: none);
        `fused`: a worker's share of a round as one TensorFlow call where the
        algorithm allows (coordinator/algorithm/fused_share.py)."""
        assert self.federation is not None and self.server is not None
        from shared import shard_format

        if self.federation.data.encoding != shard_format.EMNIST_FIXED:
            raise UsageError(
                "fedcompose's built-in models take EMNIST-shaped examples; the workers serve "
                f"{self.federation.data.describe()}: train your own learning process on them "
                "from Python (federation.train(process, preprocess=...))"
            )
        started = time.perf_counter()
        memory = MemoryPlan.of(worker_memory_mb, spec.model, spec.blocks.client_optimizer)
        try:
            algorithm = prepared.prepare(spec)
        except prepared.NotMergeable as not_mergeable:
            e = not_mergeable.__cause__ or not_mergeable
            raise UsageError(
                f"the algorithm ({spec.describe()}) cannot run across workers: TFF cannot "
                "split its round into the mergeable form "
                f"({one_line(e, 300)}); "
                "choose other blocks (`fedcompose blocks`)"
            ) from e
        executor = RoundExecutor(
            algorithm, self.federation, self.server, memory=memory, fused=fused
        )
        self._executors.append(executor)
        log.info(
            "composed %s model algorithm in %.1fs%s%s",
            spec.model,
            time.perf_counter() - started,
            " (compiled computations from the cache)" if algorithm.cached else "",
            ""
            if algorithm.empty_clients_harmless
            else " (rounds not padded: aggregator counts clients)",
        )
        return executor

    def user_round_executor(self, user: UserAlgorithm, worker_memory_mb: int = 0) -> RoundExecutor:
        """A learning process the user composed in Python, ready to drive rounds
        on this federation (refused in one line if it cannot run here)."""
        assert self.federation is not None and self.server is not None
        from coordinator.algorithm import user_process

        started = time.perf_counter()
        if user.data is None:  # the workers' format, unless the caller gave it
            user = dataclasses.replace(user, data=self.federation.data)
        algorithm = user_process.prepare(user)
        assert algorithm.model_mb is not None
        memory = MemoryPlan.for_model_size(worker_memory_mb, algorithm.model_mb)
        executor = RoundExecutor(algorithm, self.federation, self.server, memory=memory)
        self._executors.append(executor)
        log.info(
            "prepared %s in %.1fs (rounds not padded: its aggregator is not known)",
            algorithm.describe(),
            time.perf_counter() - started,
        )
        return executor

    def release(self, executor: RoundExecutor) -> None:
        """A training is over: its round executor goes (a sweep keeps none)."""
        executor.close()
        if executor in self._executors:
            self._executors.remove(executor)

    def close(self) -> None:
        for executor in self._executors:
            executor.close()
        self._executors.clear()
        if self.federation is not None:
            self.federation.close()
        if self.server is not None:
            self.server.stop()
