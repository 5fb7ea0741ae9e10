"""Federated datasets as they are before partitioning into worker shards.

A source is a list of writers (clients), each with train and test examples in
EMNIST's pixel convention. The offline default and the real federated EMNIST
both produce this, so both go through the same partitioning and shard writer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from shared import shard_format


@dataclasses.dataclass
class ClientData:
    id: str
    train_pixels: np.ndarray  # [n, 28, 28] float32, 1.0 = background
    train_labels: np.ndarray  # [n] int32
    test_pixels: np.ndarray
    test_labels: np.ndarray

    @property
    def num_train(self) -> int:
        return len(self.train_labels)

    @property
    def num_test(self) -> int:
        return len(self.test_labels)


@dataclasses.dataclass
class FederatedSource:
    """Writers in memory; `clients` keeps a stable order (sorted by id)."""

    dataset: str
    num_classes: int
    clients: list[ClientData]
    description: str = ""

    def __post_init__(self) -> None:
        self.clients.sort(key=lambda c: c.id)
        shard_format.check_client_ids(c.id for c in self.clients)

    def __iter__(self) -> Iterator[ClientData]:
        return iter(self.clients)

    @property
    def train_examples(self) -> int:
        return sum(c.num_train for c in self.clients)

    @property
    def test_examples(self) -> int:
        return sum(c.num_test for c in self.clients)

    def task(self) -> shard_format.Task:
        return shard_format.Task(dataset=self.dataset, num_classes=self.num_classes)
