"""Any of TFF's SQLite client-data files as client -> columns (`fedcompose data --from-sqlite`).

TFF's `SqlClientData` schema (the files `tff.simulation.datasets.*.load_data`
caches, and what `sql_client_data_utils.save_to_sql_client_data` writes):
`examples(split_name, client_id, serialized_example_proto)` and
`client_metadata(client_id, split_name, num_examples)`. The file does not
record the element spec, so it is taken from the examples' features: TFF's
own datasets are recognised by their feature names and get exactly the
element spec TFF's loaders give (EMNIST, CIFAR-100, Shakespeare, Stack
Overflow); any other file gets each feature as stored (bytes -> string,
int64, float -> float32; one value -> a scalar, k values -> [k]), unless
`spec` says otherwise.

Splits: "train" (or the only split) is the training data and "test" the
held-out data, by default; `splits` names others (EMNIST's
`digits_only_train`, Stack Overflow's `heldout`). Nothing is downloaded.
"""

from __future__ import annotations

import collections
import sqlite3
from pathlib import Path

import numpy as np

from deploy.data.sources import DataSourceError
from shared import element_spec
from shared.element_spec import STRING, ElementSpec, Leaf

_STACKOVERFLOW = ("creation_date", "score", "tags", "title", "tokens", "type")
KNOWN: dict[frozenset[str], tuple[str, ElementSpec]] = {
    frozenset({"label", "pixels"}): (
        "emnist",
        collections.OrderedDict(label=Leaf("int32", ()), pixels=Leaf("float32", (28, 28))),
    ),
    frozenset({"coarse_label", "image", "label"}): (
        "cifar100",
        collections.OrderedDict(
            coarse_label=Leaf("int64", ()),
            image=Leaf("uint8", (32, 32, 3)),
            label=Leaf("int64", ()),
        ),
    ),
    frozenset({"snippets"}): ("shakespeare", collections.OrderedDict(snippets=Leaf(STRING, ()))),
    frozenset(_STACKOVERFLOW): (
        "stackoverflow",
        collections.OrderedDict(
            (k, Leaf("int64" if k == "score" else STRING, ())) for k in _STACKOVERFLOW
        ),
    ),
}


def _connect(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise DataSourceError(f"{path}: no such file")
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        tables = {r[0] for r in connection.execute("SELECT name FROM sqlite_master")}
    except sqlite3.DatabaseError as e:
        raise DataSourceError(f"{path}: not a readable SQLite file ({e})") from None
    if not {"examples", "client_metadata"} <= tables:
        raise DataSourceError(
            f"{path}: no 'examples' and 'client_metadata' tables; not a TFF SqlClientData file"
        )
    return connection


def _pick_splits(path: Path, found: list[str], splits: tuple[str, ...] | None) -> tuple:
    if splits:
        missing = [s for s in splits if s not in found]
        if missing:
            raise DataSourceError(f"{path}: no split {missing[0]!r}; it has {', '.join(found)}")
        return splits[0], (splits[1] if len(splits) > 1 else None)
    if len(found) == 1:
        return found[0], None
    if "train" in found:
        return "train", "test" if "test" in found else None
    raise DataSourceError(
        f"{path}: splits {', '.join(found)}; name the training split (and the test split) "
        "with --sqlite-splits TRAIN,TEST"
    )


def _feature_spec(path: Path, blob: bytes) -> tuple[str, ElementSpec]:
    import tensorflow as tf

    example = tf.train.Example.FromString(blob)
    names = frozenset(example.features.feature)
    if names in KNOWN:
        return KNOWN[names]
    spec: collections.OrderedDict[str, ElementSpec] = collections.OrderedDict()
    for name in sorted(names):
        feature = example.features.feature[name]
        kind = feature.WhichOneof("kind")
        values = getattr(feature, kind).value
        dtype = {"bytes_list": STRING, "int64_list": "int64", "float_list": "float32"}[kind]
        spec[name] = Leaf(dtype, () if len(values) == 1 else (len(values),))
    return path.stem, spec


def _parse(blobs: list[bytes], spec: ElementSpec) -> collections.OrderedDict:
    """A client's examples parsed at once, as columns in `spec`'s dtypes."""
    import tensorflow as tf

    features = {}
    for name, leaf in element_spec.flatten(spec):
        stored = tf.string if leaf.dtype == STRING else tf.int64
        if leaf.dtype != STRING and np.dtype(leaf.dtype).kind == "f":
            stored = tf.float32
        features[name] = tf.io.FixedLenFeature(leaf.shape, stored)
    parsed = tf.io.parse_example(tf.constant(blobs, tf.string), features)
    return collections.OrderedDict(
        (name, parsed[name].numpy().astype(leaf.numpy_dtype, copy=False))
        for name, leaf in element_spec.flatten(spec)
    )


def _read_split(connection: sqlite3.Connection, split: str, spec: ElementSpec) -> dict:
    by_client: dict[str, list[bytes]] = collections.defaultdict(list)
    rows = connection.execute(
        "SELECT client_id, serialized_example_proto FROM examples WHERE split_name = ?", (split,)
    )
    for client_id, blob in rows:
        by_client[str(client_id)].append(bytes(blob))
    return {cid: _parse(blobs, spec) for cid, blobs in by_client.items()}


def load(
    path: str | Path, splits: tuple[str, ...] | None = None, spec: ElementSpec | None = None
) -> tuple[str, dict, dict | None]:
    """(dataset name, {client: train columns}, {client: test columns} or None)."""
    path = Path(path).expanduser()
    connection = _connect(path)
    try:
        found = sorted(r[0] for r in connection.execute("SELECT DISTINCT split_name FROM examples"))
        train_split, test_split = _pick_splits(path, found, splits)
        first = connection.execute(
            "SELECT serialized_example_proto FROM examples WHERE split_name = ? LIMIT 1",
            (train_split,),
        ).fetchone()
        if first is None:
            raise DataSourceError(f"{path}: split {train_split!r} holds no examples")
        name, detected = _feature_spec(path, bytes(first[0]))
        spec = spec or detected
        try:
            train = _read_split(connection, train_split, spec)
            test = _read_split(connection, test_split, spec) if test_split else None
        except Exception as e:  # TF's parse errors come in several kinds
            first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise DataSourceError(
                f"{path}: examples do not parse as {element_spec.describe(spec)} "
                f"({type(e).__name__}: {first_line})"
            ) from None
    finally:
        connection.close()
    return name, train, test
