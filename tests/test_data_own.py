"""`fedcompose data --from-sqlite / --from-table`: shards of any structure from
files on disk, through the real command line.

The SQLite file is written by TFF's own `save_to_sql_client_data` in
CIFAR-100's feature layout (so it is recognised and read with CIFAR-100's
element spec, as TFF's loader gives it), with a train and a test split."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np

from client_worker.shard_check import check_shard
from deploy.data import shards, tff_sqlite
from shared import element_spec, shard_format, tensor_records
from tests.conftest import fedcompose


def _cifar_like_sqlite(path: Path) -> None:
    import tensorflow as tf
    import tensorflow_federated as tff

    rng = np.random.default_rng(0)
    clients = {}
    for i, split in [(0, "train"), (1, "train"), (2, "train"), (0, "test"), (1, "test")]:
        n = 3 if split == "train" else 2
        clients[f"{split}:{i}"] = collections.OrderedDict(
            coarse_label=rng.integers(0, 20, n).astype(np.int64),
            image=rng.integers(0, 256, (n, 32, 32, 3)).astype(np.int64),
            label=rng.integers(0, 100, n).astype(np.int64),
        )

    def dataset_fn(key: str) -> tf.data.Dataset:
        return tf.data.Dataset.from_tensor_slices(clients[key])

    # TFF keys rows by (split, client id); the same id in both splits is one client.
    tff.simulation.datasets.sql_client_data_utils.save_to_sql_client_data(
        list(clients),
        dataset_fn,
        str(path),
        split_names_by_client_id={k: k.split(":")[0] for k in clients},
    )
    import sqlite3

    with sqlite3.connect(path) as db:
        for table in ("examples", "client_metadata"):
            db.execute(
                f"UPDATE {table} SET client_id = substr(client_id, instr(client_id, ':') + 1)"
            )


def test_from_tff_sqlite_gets_the_datasets_own_spec(tmp_path):
    db = tmp_path / "cifar_like.sqlite"
    _cifar_like_sqlite(db)
    name, train, test = tff_sqlite.load(db)
    assert name == "cifar100" and sorted(train) == ["0", "1", "2"] and sorted(test) == ["0", "1"]
    out = tmp_path / "shards"
    result = fedcompose(
        "data",
        "--shards-dir",
        str(out),
        "--from-sqlite",
        str(db),
        "--workers",
        "2",
        "--label-key",
        "label",
        check=True,
    )
    assert "{coarse_label: int64[], image: uint8[32,32,3], label: int64[]}" in result.stdout
    found = shards.existing_shards(out)
    manifests = [check_shard(s) for s in found]
    assert sum(m.train_examples for m in manifests) == 9
    assert sum(m.test_examples for m in manifests) == 4
    assert (
        manifests[0].data.spec == tff_sqlite.KNOWN[frozenset({"coarse_label", "image", "label"})][1]
    )


def test_from_table_npz_with_split_column(tmp_path):
    rng = np.random.default_rng(1)
    n = 20
    table = tmp_path / "mine.npz"
    np.savez(
        table,
        user=np.array([f"u{i % 4}" for i in range(n)]),
        split=np.array(["test" if i % 5 == 0 else "train" for i in range(n)]),
        pixels=rng.random((n, 6, 6)).astype(np.float32),
        y=rng.integers(0, 3, n),
    )
    out = tmp_path / "shards"
    fedcompose(
        "data",
        "--shards-dir",
        str(out),
        "--from-table",
        str(table),
        "--workers",
        "2",
        "--client-id-column",
        "user",
        "--label-key",
        "y",
        "--partition",
        "dirichlet",
        check=True,
    )
    manifests = [check_shard(s) for s in shards.existing_shards(out)]
    assert element_spec.describe(manifests[0].data.spec) == "{pixels: float32[6,6], y: int64[]}"
    assert sum(m.train_examples for m in manifests) == 16
    assert sum(m.test_examples for m in manifests) == 4
    shard = shards.existing_shards(out)[0]
    client = manifests[0].clients[0]
    path = shard / shard_format.client_path("train", client.id, manifests[0].data)
    count, _ = tensor_records.decode(path.read_bytes(), manifests[0].data.spec)
    assert count == client.train_examples


def test_bad_options_are_refused_in_one_line(tmp_path):
    out = str(tmp_path / "s")
    result = fedcompose("data", "--shards-dir", out, "--from-table", "x.npz", "--source", "emnist")
    assert result.returncode == 2 and "--source does not apply with --from-table" in result.stderr
    result = fedcompose("data", "--shards-dir", out, "--label-key", "y")
    assert result.returncode == 2
    assert "--label-key applies to --from-sqlite or --from-table only" in result.stderr
    result = fedcompose("data", "--shards-dir", out, "--from-sqlite", str(tmp_path / "none.sqlite"))
    assert result.returncode == 3 and "none.sqlite: no such file" in result.stderr
    assert "Traceback" not in result.stderr
