"""Worker shards from your own federated data: `build_shards(source, out_dir, workers=N)`.

    import fedcompose
    fedcompose.build_shards(train, "shards", workers=3, test=test,
                            partition="dirichlet", label_key="label", alpha=0.5)
    with fedcompose.LocalFederation(shards_dir="shards") as federation:
        federation.raw_element_spec()   # what `preprocess` gets: your examples' spec

`source` (and `test`, the held-out examples, optional) is one of:

- a `tff.simulation.datasets.ClientData` (TFF's datasets, `SqlClientData`,
  `from_clients_and_tf_fn`, ...): its `element_spec` is recorded as is;
- a mapping client id -> examples, the examples a dict (nested dicts and
  tuples allowed) of columns over the client's examples: a numpy array
  `[n, ...]` is a fixed-shape field; a list of `n` arrays (or an object array
  of arrays) is a variable-length field (`[None, ...]`: token ids); str or
  bytes values are string fields;
- a pandas DataFrame, one row per example, with a client-id column
  (`client_id_column`); every other column is a field (scalars, strings, or
  arrays per row: fixed shape if all rows agree, else variable-length).

Each client's train examples and the test examples of the same client id go
to one shard, whole clients per worker (balanced by example count), as for
EMNIST. A test-only client id is left out (counted in the manifest).
`partition`: "natural" keeps the clients, "iid" and "dirichlet" re-deal the
examples to as many synthetic clients (`partition.py`'s rules; "dirichlet"
needs `label_key`, the path of an integer scalar field, e.g. "label" or
"labels/fine"). The shards use the stacked-tensors encoding
(`shared.tensor_records`), whatever the structure.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from deploy.data import partition as partition_lib
from deploy.data import shards
from deploy.data.tensor_source import Columns, TensorClient, TensorSource, concat, repartition
from deploy.data.tensor_source import write_client as write_tensor_client
from shared import element_spec, shard_format, tensor_records
from shared.element_spec import STRING, ElementSpec, Leaf, SpecError
from shared.errors import UsageError


def _leaf_of(path: str, values: Any) -> Leaf:
    """The leaf a column of one client makes (see the module docstring)."""
    if isinstance(values, np.ndarray) and values.dtype != object:
        if values.dtype.kind in "US":
            return Leaf(STRING, tuple(values.shape[1:]))
        return Leaf(values.dtype.name, tuple(values.shape[1:]))
    if isinstance(values, list | tuple | np.ndarray):
        items = list(values)
        if not items or all(isinstance(v, str | bytes) for v in items):
            return Leaf(STRING, ())
        rows = [np.asarray(v) for v in items]
        first = rows[0]
        kind = STRING if first.dtype.kind in "USO" else first.dtype.name
        return Leaf(kind, (None, *first.shape[1:]))
    raise SpecError(
        f"field {path!r}: {type(values).__name__} is not a column; give a numpy array "
        "[examples, ...] or a list of per-example arrays"
    )


def spec_of(examples: Any, path: str = "") -> ElementSpec:
    """The element spec of one client's columns (nested dicts and tuples)."""
    if isinstance(examples, Mapping):
        return collections.OrderedDict(
            (str(k), spec_of(v, f"{path}/{k}" if path else str(k))) for k, v in examples.items()
        )
    if isinstance(examples, tuple):
        return tuple(spec_of(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(examples))
    return _leaf_of(path, examples)


def _columns(examples: Any, spec: ElementSpec) -> Columns:
    def walk(value: Any, s: ElementSpec) -> list:
        if isinstance(s, Leaf):
            return [value]
        if isinstance(s, dict):
            if not isinstance(value, Mapping) or set(value) != set(s):
                raise SpecError(f"fields {sorted(value)} differ from {sorted(s)}")
            return [c for k, sub in s.items() for c in walk(value[k], sub)]
        return [c for v, sub in zip(value, s, strict=True) for c in walk(v, sub)]

    return walk(examples, spec)


def _merge(a: ElementSpec, b: ElementSpec) -> ElementSpec:
    """One spec for two clients' columns: a fixed first dim that differs becomes None."""
    if isinstance(a, Leaf) and isinstance(b, Leaf):
        if a == b:
            return a
        if a.dtype == b.dtype and a.inner_shape == b.inner_shape and (a.variable or b.variable):
            return Leaf(a.dtype, (None, *a.inner_shape))
    elif isinstance(a, dict) and isinstance(b, dict) and list(a) == list(b):
        return collections.OrderedDict((k, _merge(a[k], b[k])) for k in a)
    elif isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        return tuple(_merge(x, y) for x, y in zip(a, b, strict=True))
    raise SpecError(
        f"clients' examples differ in structure: {element_spec.describe(a)} and "
        f"{element_spec.describe(b)}"
    )


def from_mapping(train: Mapping[str, Any], test: Mapping[str, Any] | None) -> tuple:
    """(spec, {client: train columns}, {client: test columns}) of Python data."""
    if not train:
        raise UsageError("no clients: the mapping of client id -> examples is empty")
    spec: ElementSpec | None = None
    for examples in [*train.values(), *(test or {}).values()]:
        one = spec_of(examples)
        spec = one if spec is None else _merge(spec, one)
    assert spec is not None
    as_columns = {str(k): _columns(v, spec) for k, v in train.items()}
    held_out = {str(k): _columns(v, spec) for k, v in (test or {}).items()}
    return spec, as_columns, held_out


def _frame_column(values: Any) -> Any:
    items = list(values)
    if items and not isinstance(items[0], str | bytes) and np.ndim(items[0]) > 0:
        rows = [np.asarray(v) for v in items]
        if len({r.shape for r in rows}) == 1:
            return np.stack(rows)
        return rows
    return np.asarray(items) if items and isinstance(items[0], str | bytes) else values.to_numpy()


def from_frame(frame: Any, client_id_column: str) -> dict[str, Any]:
    """client id -> {column: values} of a DataFrame with one row per example."""
    if client_id_column not in frame.columns:
        raise UsageError(
            f"the table has no client-id column {client_id_column!r} (columns: "
            f"{', '.join(map(str, frame.columns))}); name it with client_id_column="
        )
    fields = [c for c in frame.columns if c != client_id_column]
    whole = {str(c): _frame_column(frame[c]) for c in fields}
    ids = frame[client_id_column].astype(str).to_numpy()
    out: dict[str, Any] = {}
    for cid in dict.fromkeys(ids):
        rows = np.flatnonzero(ids == cid)
        out[cid] = {
            name: col[rows] if isinstance(col, np.ndarray) else [col[i] for i in rows]
            for name, col in whole.items()
        }
    return out


def from_client_data(client_data: Any) -> tuple[ElementSpec, dict[str, Columns]]:
    """(spec, {client: columns}) of a TFF ClientData, read client by client."""
    from shared import tensor_reader

    spec = tensor_reader.from_tf(client_data.element_type_structure)
    leaves = list(element_spec.flatten(spec))
    out: dict[str, Columns] = {}
    for cid in client_data.client_ids:
        examples = [
            [leaf for _, leaf in element_spec.flatten_values(spec, e)]
            for e in client_data.create_tf_dataset_for_client(cid).as_numpy_iterator()
        ]
        out[str(cid)] = _stack(examples, leaves)
    return spec, out


def _stack(examples: list[list[Any]], leaves: list[tuple[str, Leaf]]) -> Columns:
    columns: Columns = []
    for i, (_, leaf) in enumerate(leaves):
        values = [e[i] for e in examples]
        if leaf.variable:
            columns.append([np.asarray(v, dtype=leaf.numpy_dtype) for v in values])
        elif values:
            columns.append(np.asarray(values, dtype=leaf.numpy_dtype).reshape(-1, *leaf.shape))
        else:
            columns.append(np.zeros((0, *leaf.shape), leaf.numpy_dtype))
    return columns


def _as_columns(source: Any, client_id_column: str) -> tuple[ElementSpec, dict, str]:
    if hasattr(source, "create_tf_dataset_for_client"):
        spec, columns = from_client_data(source)
        return spec, columns, f"{type(source).__name__} of {len(columns)} clients"
    if hasattr(source, "columns") and hasattr(source, "iloc"):
        source = from_frame(source, client_id_column)
    if isinstance(source, Mapping):
        spec, columns, _ = from_mapping(source, None)
        return spec, columns, f"{len(columns)} clients from Python data"
    raise UsageError(
        f"cannot build shards from a {type(source).__name__}: give a TFF ClientData, a "
        "mapping client id -> examples, or a pandas DataFrame with a client-id column"
    )


def _num_classes(spec: ElementSpec, label_key: str | None, parts: list[Columns]) -> int:
    if label_key is None:
        return 0
    leaf = element_spec.leaf_at(spec, label_key)
    if leaf.shape != () or leaf.dtype == STRING or np.dtype(leaf.dtype).kind not in "iu":
        raise UsageError(
            f"label_key {label_key!r} is {leaf.describe()}: a label must be an integer scalar"
        )
    index = [p for p, _ in element_spec.flatten(spec)].index(label_key)
    labels = np.concatenate([np.asarray(p[index]).reshape(-1) for p in parts] or [[0]])
    if labels.size and labels.min() < 0:
        raise UsageError(f"label_key {label_key!r}: labels must be >= 0, found {labels.min()}")
    return int(labels.max()) + 1 if labels.size else 0


def tensor_source(
    source: Any,
    test: Any = None,
    *,
    label_key: str | None = None,
    dataset: str = "",
    client_id_column: str = "client_id",
    num_classes: int | None = None,
) -> TensorSource:
    """The clients of `source` (and `test`) in memory, in one element spec."""
    spec, train, description = _as_columns(source, client_id_column)
    held_out: dict[str, Columns] = {}
    if test is not None:
        test_spec, held_out, _ = _as_columns(test, client_id_column)
        spec = _merge(spec, test_spec)
    data = shard_format.DataFormat(shard_format.STACKED_TENSORS, spec, label_key)
    left_out = sorted(set(held_out) - set(train))
    empty = concat([], spec)
    clients = []
    for cid, columns in train.items():
        test_columns = held_out.get(cid, empty)
        clients.append(
            TensorClient(
                cid,
                columns,
                test_columns,
                tensor_records.num_examples(spec, columns),
                tensor_records.num_examples(spec, test_columns),
            )
        )
    parts = [c.train for c in clients] + [c.test for c in clients]
    found = _num_classes(spec, label_key, parts)
    return TensorSource(
        dataset=dataset or "user-data",
        data=data,
        num_classes=num_classes if num_classes is not None else found,
        clients=clients,
        description=description,
        writers_left_out=len(left_out),
        examples_left_out=sum(tensor_records.num_examples(spec, held_out[c]) for c in left_out),
    )


def write(
    source: TensorSource,
    out_dir: Path,
    workers: int,
    partition: str = "natural",
    alpha: float = 0.5,
    seed: int = 0,
) -> list[Path]:
    """Shards of `source` (re-dealt by `partition`) under `out_dir`."""
    source = repartition(source, partition, alpha, seed)
    empty_train = [c.id for c in source.clients if c.num_train == 0]
    if empty_train:
        raise UsageError(
            f"client {empty_train[0]!r} has no training examples ({len(empty_train)} such "
            "clients); leave them out, every client must have some"
        )
    assignment = partition_lib.balanced_writer_assignment(source, workers, seed)  # type: ignore[arg-type]
    info = {
        "scheme": partition,
        "alpha": alpha if partition == "dirichlet" else None,
        "seed": seed,
        "num_shards": workers,
        "source": source.dataset,
        "source_description": source.description,
        "clients": len(source.clients),
        "writers_left_out": source.writers_left_out,
        "examples_left_out": source.examples_left_out,
    }
    shards.write_shards(
        source,
        assignment,
        Path(out_dir),
        info,
        data=source.data,
        write_client=lambda target, client: write_tensor_client(target, client, source.data),
    )
    return shards.existing_shards(Path(out_dir))


def build_shards(
    source: Any,
    out_dir: str | Path,
    *,
    workers: int,
    test: Any = None,
    partition: str = "natural",
    label_key: str | None = None,
    alpha: float = 0.5,
    seed: int = 0,
    dataset: str = "",
    client_id_column: str = "client_id",
    num_classes: int | None = None,
) -> list[Path]:
    """Writes `workers` shards of `source` under `out_dir` and returns their
    directories (see the module docstring for what `source` may be)."""
    if not isinstance(workers, int) or workers < 1:
        raise UsageError(f"workers must be an int >= 1, got {workers!r}")
    try:
        built = tensor_source(
            source,
            test,
            label_key=label_key,
            dataset=dataset,
            client_id_column=client_id_column,
            num_classes=num_classes,
        )
    except SpecError as e:
        raise UsageError(str(e)) from None
    return write(built, Path(out_dir), workers, partition, alpha, seed)
