"""What the algorithm is made of, as plain settings (no TensorFlow here)."""

from __future__ import annotations

import dataclasses
from typing import Any

from shared.config import OPTIMIZER_PARAMETERS, AlgorithmConfig, RunConfig


@dataclasses.dataclass(frozen=True)
class AlgorithmSpec:
    model: str = "linear"
    num_classes: int = 10
    client_learning_rate: float = 0.3
    server_learning_rate: float = 1.0
    clip_norm: float = 1.0
    batch_size: int = 20
    local_epochs: int = 1
    shuffle_buffer: int = 100
    eval_batch_size: int = 256
    clients_per_round: int = 10
    """What DP aggregators normalize by (TFF's `clients_per_round`)."""
    blocks: AlgorithmConfig = dataclasses.field(default_factory=AlgorithmConfig)
    """The four blocks and their parameters, as `[algorithm]` holds them."""

    @classmethod
    def from_config(cls, config: RunConfig, num_classes: int) -> AlgorithmSpec:
        t = config.training
        return cls(
            model=config.model.model,
            num_classes=num_classes,
            client_learning_rate=t.client_learning_rate,
            server_learning_rate=t.server_learning_rate,
            clip_norm=t.clip_norm,
            batch_size=t.batch_size,
            local_epochs=t.local_epochs,
            shuffle_buffer=t.shuffle_buffer,
            clients_per_round=t.clients_per_round,
            blocks=dataclasses.replace(config.algorithm),
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AlgorithmSpec:
        """A spec from plain data (the tests pass JSON);
        `blocks` may hold any subset of `[algorithm]`'s settings."""
        values = dict(values)
        blocks = AlgorithmConfig(**values.pop("blocks", {}))
        return cls(**values, blocks=blocks)

    def optimizer_parameters(self, side: str) -> dict[str, float]:
        """The chosen client or server optimizer's parameters, by TFF-neutral name."""
        name = getattr(self.blocks, f"{side}_optimizer")
        return {p: getattr(self.blocks, f"{side}_{p}") for p in OPTIMIZER_PARAMETERS[name]}

    def describe(self) -> str:
        """One line naming the four blocks, for logs and messages."""
        b = self.blocks
        client = f"{b.client_work} {b.client_optimizer}"
        if b.proximal_mu:
            client += f" + proximal mu {b.proximal_mu:g}"
        aggregator = b.aggregator
        if b.aggregator in ("mean", "robust", "compression"):
            aggregator += f" ({b.weighting}-weighted)"
        return (
            f"{b.distributor} -> {client} -> {aggregator} -> server {b.server_optimizer} "
            f"(lr {self.server_learning_rate:g})"
        )
