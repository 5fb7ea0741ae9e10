"""A federated source of any element structure, and its IID and Dirichlet re-splits.

The counterpart of `sources.FederatedSource` for data that is not EMNIST-shaped:
each client holds its train and test examples as columns (one per leaf of the
element spec, `shared.tensor_records`), and shards are written in the
stacked-tensors encoding. The partitions follow `partition.py`'s rules
exactly (same client sizes, same Dirichlet dealing by the label field), so a
labelled dataset of any structure re-splits as EMNIST does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from deploy.data import partition as partition_lib
from shared import element_spec, shard_format, tensor_records
from shared.errors import UsageError

Columns = list[tensor_records.Column]


def take_rows(columns: Columns, rows: np.ndarray) -> Columns:
    """The examples at `rows` of every column."""
    return [c[rows] if isinstance(c, np.ndarray) else [c[i] for i in rows] for c in columns]


def concat(parts: Sequence[Columns], spec: element_spec.ElementSpec) -> Columns:
    """Examples of several clients, one after another, as one set of columns."""
    out: Columns = []
    for i, (_, leaf) in enumerate(element_spec.flatten(spec)):
        if leaf.variable:
            out.append([row for p in parts for row in p[i]])
        elif parts:
            out.append(np.concatenate([np.asarray(p[i]) for p in parts]))
        else:
            out.append(np.zeros((0, *leaf.shape), leaf.numpy_dtype))
    return out


@dataclasses.dataclass(eq=False)
class TensorClient:
    id: str
    train: Columns
    test: Columns
    num_train: int
    num_test: int

    def columns(self, split: str) -> Columns:
        return self.train if split == "train" else self.test


@dataclasses.dataclass
class TensorSource:
    """Clients of one element spec; `clients` sorted by id, as `FederatedSource`'s."""

    dataset: str
    data: shard_format.DataFormat
    num_classes: int
    clients: list[TensorClient]
    description: str = ""
    writers_left_out: int = 0
    examples_left_out: int = 0

    def __post_init__(self) -> None:
        self.clients.sort(key=lambda c: c.id)
        shard_format.check_client_ids(c.id for c in self.clients)

    def __iter__(self) -> Iterator[TensorClient]:
        return iter(self.clients)

    def task(self) -> shard_format.Task:
        return shard_format.Task(self.dataset, self.num_classes, ())

    def pooled(self, split: str) -> Columns:
        return concat([c.columns(split) for c in self.clients], self.data.spec)

    def labels(self, columns: Columns) -> np.ndarray:
        """The label column of `columns` (the `label_key` leaf) as int64."""
        if self.data.label_key is None:
            raise UsageError(
                "this partition deals examples by label: give label_key= (the label field)"
            )
        index = [p for p, _ in element_spec.flatten(self.data.spec)].index(self.data.label_key)
        return np.asarray(columns[index]).astype(np.int64).reshape(-1)


def write_client(target: Path, client: TensorClient, data: shard_format.DataFormat):
    train_sha, n_train = shard_format.write_tensors(target, client.id, "train", data, client.train)
    test_sha, n_test = shard_format.write_tensors(target, client.id, "test", data, client.test)
    return shard_format.ClientEntry(client.id, n_train, n_test, train_sha, test_sha)


def repartition(source: TensorSource, scheme: str, alpha: float, seed: int) -> TensorSource:
    """`partition.repartition` for a `TensorSource`: the same clients' sizes,
    the examples re-dealt uniformly (iid) or by Dirichlet label mixes."""
    if scheme == "natural":
        return source
    if scheme not in partition_lib.SCHEMES:
        raise UsageError(
            f"unknown partition {scheme!r}; choose one of {', '.join(partition_lib.SCHEMES)}"
        )
    rng = np.random.default_rng(seed)
    train, test = source.pooled("train"), source.pooled("test")
    train_sizes = [c.num_train for c in source.clients]
    test_sizes = [c.num_test for c in source.clients]
    if scheme == "iid":
        train_rows = partition_lib._deal_uniformly(sum(train_sizes), train_sizes, rng)
        test_rows = partition_lib._deal_uniformly(sum(test_sizes), test_sizes, rng)
        prefix, how = "iid", f"re-dealt IID (seed {seed})"
    else:
        if not alpha > 0:
            raise UsageError(f"Dirichlet alpha must be > 0, got {alpha}")
        train_labels, test_labels = source.labels(train), source.labels(test)
        k = source.num_classes
        mixes = partition_lib._label_mixes(train_labels, k, alpha, len(train_sizes), rng)
        train_rows = partition_lib._deal_by_mix(train_labels, k, train_sizes, mixes, rng)
        test_rows = partition_lib._deal_by_mix(test_labels, k, test_sizes, mixes, rng)
        prefix, how = "dir", f"re-dealt with Dirichlet(alpha={alpha}) label mixes (seed {seed})"
    width = max(4, len(str(len(train_sizes) - 1)))
    clients = [
        TensorClient(
            f"{prefix}-{j:0{width}d}",
            take_rows(train, train_rows[j]),
            take_rows(test, test_rows[j]),
            len(train_rows[j]),
            len(test_rows[j]),
        )
        for j in range(len(train_sizes))
    ]
    return dataclasses.replace(
        source,
        clients=clients,
        description=f"{source.description}; {how} into {len(clients)} synthetic clients",
    )
