"""What the algorithm is made of, as plain settings (no TensorFlow here)."""

from __future__ import annotations

import dataclasses

from shared.config import RunConfig


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
        )
