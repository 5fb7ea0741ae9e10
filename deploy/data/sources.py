"""Federated datasets as they are before partitioning into worker shards.

A source is a list of writers (clients), each with train and test examples in
EMNIST's pixel convention. The offline default and the real federated EMNIST
both produce this, so both go through the same partitioning and shard writer.

Clients come in two kinds with the same read interface (`id`, `num_train`,
`train_pixels`, ...): `ClientData` owns its arrays (the small offline
default), `PooledClient` selects rows of arrays shared by the whole split (the
real EMNIST, about 2 GB with all 62 classes, and re-splits of it), so that a
source is held in memory once however it is re-dealt.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from shared import shard_format
from shared.errors import DataError


class DataSourceError(DataError):
    """A data source is missing, unreadable or malformed.

    `str()` is one line that names the file and the problem, fit to show a user
    as is.
    """


Progress = Callable[[str, int, str], contextlib.AbstractContextManager[Callable[[int], None]]]
"""`progress(description, total, unit)` opens a progress display and yields
`advance(n)`; the command line passes tqdm, libraries default to nothing."""


@contextlib.contextmanager
def no_progress(_description: str, _total: int, _unit: str) -> Iterator[Callable[[int], None]]:
    yield lambda _n: None


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


@dataclasses.dataclass(frozen=True, eq=False)  # compared by identity: they are gigabytes
class ExamplePool:
    """Examples of one split in one pair of arrays that clients select rows of."""

    pixels: np.ndarray  # [n, 28, 28] float32, 1.0 = background
    labels: np.ndarray  # [n] int32

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def empty(cls, size: int) -> ExamplePool:
        return cls(
            pixels=np.empty((size, *shard_format.IMAGE_SHAPE), dtype=np.float32),
            labels=np.empty(size, dtype=np.int32),
        )


Rows = slice | np.ndarray
"""A contiguous range (selects a view) or an index array (copies on access)."""


def _num_rows(rows: Rows, pool_size: int) -> int:
    if isinstance(rows, slice):
        return len(range(*rows.indices(pool_size)))
    return len(rows)


@dataclasses.dataclass(eq=False)
class PooledClient:
    """A client whose examples are rows of shared pools.

    A slice gives views, so a natural writer costs nothing beyond the pool; an
    index array (a re-split) copies the client's examples only when they are
    read, one client at a time, while its shard files are written.
    """

    id: str
    train_pool: ExamplePool
    train_rows: Rows
    test_pool: ExamplePool
    test_rows: Rows

    @property
    def train_pixels(self) -> np.ndarray:
        return self.train_pool.pixels[self.train_rows]

    @property
    def train_labels(self) -> np.ndarray:
        return self.train_pool.labels[self.train_rows]

    @property
    def test_pixels(self) -> np.ndarray:
        return self.test_pool.pixels[self.test_rows]

    @property
    def test_labels(self) -> np.ndarray:
        return self.test_pool.labels[self.test_rows]

    @property
    def num_train(self) -> int:
        return _num_rows(self.train_rows, len(self.train_pool))

    @property
    def num_test(self) -> int:
        return _num_rows(self.test_rows, len(self.test_pool))

    def pool(self, split: str) -> ExamplePool:
        return self.train_pool if split == "train" else self.test_pool

    def rows(self, split: str) -> Rows:
        return self.train_rows if split == "train" else self.test_rows


Client = ClientData | PooledClient


@dataclasses.dataclass
class FederatedSource:
    """Writers in memory; `clients` keeps a stable order (sorted by id)."""

    dataset: str
    num_classes: int
    clients: list[Client]
    description: str = ""
    writers_left_out: int = 0
    """Writers of the raw data that are not clients here (e.g. no training examples)."""
    examples_left_out: int = 0
    """Examples those writers held, which are therefore in no shard."""

    def __post_init__(self) -> None:
        self.clients.sort(key=lambda c: c.id)
        shard_format.check_client_ids(c.id for c in self.clients)

    def __iter__(self) -> Iterator[Client]:
        return iter(self.clients)

    @property
    def train_examples(self) -> int:
        return sum(c.num_train for c in self.clients)

    @property
    def test_examples(self) -> int:
        return sum(c.num_test for c in self.clients)

    def task(self) -> shard_format.Task:
        return shard_format.Task(dataset=self.dataset, num_classes=self.num_classes)

    def pooled(self, split: str) -> ExamplePool:
        """Every example of `split` across all clients, each exactly once.

        When the clients tile one shared pool with contiguous ranges (how the
        EMNIST reader lays writers out) that pool is returned as is, so pooling
        the full data set for a re-split costs no memory; otherwise the
        clients' examples are concatenated in client order.
        """
        shared_pool = self._tiled_pool(split)
        if shared_pool is not None:
            return shared_pool
        if not self.clients:
            return ExamplePool.empty(0)
        pixels = [c.train_pixels if split == "train" else c.test_pixels for c in self.clients]
        labels = [c.train_labels if split == "train" else c.test_labels for c in self.clients]
        return ExamplePool(
            pixels=np.concatenate(pixels)
            .astype(np.float32, copy=False)
            .reshape(-1, *shard_format.IMAGE_SHAPE),
            labels=np.concatenate(labels).astype(np.int32, copy=False),
        )

    def _tiled_pool(self, split: str) -> ExamplePool | None:
        """The pool the clients' `split` rows exactly cover with slices, if any."""
        if not self.clients or not all(isinstance(c, PooledClient) for c in self.clients):
            return None
        pooled: list[PooledClient] = self.clients  # type: ignore[assignment]
        pool = pooled[0].pool(split)
        ranges = []
        for client in pooled:
            rows = client.rows(split)
            if client.pool(split) is not pool or not isinstance(rows, slice):
                return None
            start, stop, step = rows.indices(len(pool))
            if step != 1:
                return None
            ranges.append((start, stop))
        ranges.sort()
        position = 0
        for start, stop in ranges:
            if start != position:
                return None
            position = max(position, stop)
        return pool if position == len(pool) else None
