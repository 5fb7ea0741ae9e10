"""What every measured system runs: the same clients, data and settings.

The plan is computed once by the benchmark and handed to every child process
as JSON, so that plain Keras, TFF in one process and fedcompose with any
number of workers train on exactly the same sampled clients in every round.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from coordinator import federation

WARMUP_ROUND = 0
"""Round number of the unmeasured warm-up round; measured rounds are 1..R."""


@dataclasses.dataclass(frozen=True)
class Plan:
    models: tuple[str, ...]
    clients_per_round: tuple[int, ...]
    rounds: int
    """Measured rounds per workload, after one warm-up round."""
    batch_size: int
    local_epochs: int
    client_ids: tuple[str, ...]
    """Every hosted client, sorted, as the coordinator sees them."""
    seed: int = 0
    client_learning_rate: float = 0.3
    rpc_timeout: float = 1800.0
    skip: tuple[str, ...] = ()
    """Workloads left out, as "model/clients" keys."""
    worker_memory_mb: int = 0
    """fedcompose workers' memory budget (0: none, one call per worker)."""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, body: dict) -> Plan:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in body.items() if k in fields}
        for name in ("models", "clients_per_round", "client_ids", "skip"):
            values[name] = tuple(values[name])
        return cls(**values)

    def round_numbers(self) -> list[int]:
        return [WARMUP_ROUND, *range(1, self.rounds + 1)]

    def sampled(self, round_num: int, clients_per_round: int) -> list[str]:
        """The round's clients: what the coordinator's sampler picks."""
        return federation.sample_clients(
            list(self.client_ids), round_num, clients_per_round, self.seed
        )

    def shuffle_seed(self, round_num: int) -> int:
        return federation.shuffle_seed(self.seed, round_num)

    def clients_for(self, model: str) -> list[int]:
        """The clients-per-round settings measured for `model`."""
        return [c for c in self.clients_per_round if f"{model}/{c}" not in self.skip]

    def workloads(self) -> Iterator[tuple[str, int]]:
        for model in self.models:
            for clients in self.clients_for(model):
                yield model, clients

    def algorithm_options(self, model: str) -> dict:
        """Keyword arguments of `coordinator.algorithm.AlgorithmSpec`."""
        return {
            "model": model,
            "num_classes": 10,
            "client_learning_rate": self.client_learning_rate,
            "batch_size": self.batch_size,
            "local_epochs": self.local_epochs,
        }
