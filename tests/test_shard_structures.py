"""Shards of any element structure (manifest v2, stacked-tensors): written, read
back by numpy and by the workers' TensorFlow reader, checked, and refused in
one line when damaged or mixed with another structure. v1 shards still read."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest

from client_worker.shard_check import check_shard
from deploy.data import client_data, shards
from shared import element_spec, shard_format, tensor_records
from shared.element_spec import Leaf
from shared.errors import UsageError
from shared.shard_format import ShardError

SPEC = collections.OrderedDict(
    image=Leaf("uint8", (8, 8, 3)),
    label=Leaf("int64", ()),
    text=collections.OrderedDict(title=Leaf("string", ()), tokens=Leaf("int64", (None,))),
    pair=(Leaf("float32", (2,)), Leaf("string", (None,))),
)


def examples(rng: np.random.Generator, n: int) -> dict:
    """One client's columns in SPEC's structure (nested dicts and a tuple)."""
    return {
        "image": rng.integers(0, 256, (n, 8, 8, 3)).astype(np.uint8),
        "label": rng.integers(0, 4, n).astype(np.int64),
        "text": {
            "title": np.array([b"t" * i for i in range(n)], dtype=object),
            "tokens": [rng.integers(0, 99, rng.integers(0, 5)) for _ in range(n)],
        },
        "pair": (
            rng.random((n, 2)).astype(np.float32),
            [np.array([b"w"] * (i % 3), dtype=object) for i in range(n)],
        ),
    }


def columns_of(value: dict) -> list:
    return [v for _, v in element_spec.flatten_values(SPEC, value)]


def test_round_trip_numpy_and_tensorflow(tmp_path):
    import tensorflow as tf

    from shared import tensor_reader

    rng = np.random.default_rng(0)
    given = columns_of(examples(rng, 5))
    data = tensor_records.encode(SPEC, given)
    n, back = tensor_records.decode(data, SPEC)
    assert n == 5
    path = tmp_path / "c.tensors"
    path.write_bytes(data)
    ds = tensor_reader.client_examples(tf.constant(str(path)), tf.constant(False), SPEC)
    assert ds.element_spec == tensor_reader.to_tf(SPEC)
    assert tensor_reader.from_tf(ds.element_spec) == SPEC
    read = [columns_of(e) for e in ds.as_numpy_iterator()]
    assert len(read) == 5
    for leaf_index, (_, leaf) in enumerate(element_spec.flatten(SPEC)):
        for i in range(5):
            for got in (np.asarray(back[leaf_index][i]), np.asarray(read[i][leaf_index])):
                want = np.asarray(given[leaf_index][i])
                assert got.shape == want.shape
                assert got.tolist() == want.tolist(), (leaf, i)
    empty = tensor_reader.client_examples(tf.constant(""), tf.constant(True), SPEC)
    assert empty.element_spec == ds.element_spec and not list(empty)
    # TFF serializes every client's dataset, an empty one (padding, no test examples) too.
    for dataset in (ds, empty):
        assert tf.raw_ops.DatasetToGraphV2(input_dataset=dataset._variant_tensor).numpy()


def test_spec_json_round_trip_and_one_line_description():
    assert element_spec.from_json(json.loads(json.dumps(element_spec.to_json(SPEC)))) == SPEC
    assert element_spec.describe(SPEC) == (
        "{image: uint8[8,8,3], label: int64[], text: {title: string[], tokens: int64[None]}, "
        "pair: (float32[2], string[None])}"
    )
    with pytest.raises(element_spec.SpecError, match="only the first dimension may be unknown"):
        Leaf("int64", (3, None))


def build(tmp_path: Path, workers: int = 2, **kwargs) -> list[Path]:
    rng = np.random.default_rng(1)
    train = {f"client-{i}": examples(rng, 4 + i) for i in range(5)}
    test = {f"client-{i}": examples(rng, 2) for i in range(5)}
    return client_data.build_shards(
        train, tmp_path / "shards", workers=workers, test=test, label_key="label", **kwargs
    )


def test_built_shards_record_the_spec_and_pass_both_checks(tmp_path):
    found = build(tmp_path)
    assert len(found) == 2
    for shard in found:
        for deep in (False, True):
            manifest = check_shard(shard, deep=deep)
        assert manifest.format_version == 2
        assert manifest.data.encoding == "stacked-tensors"
        assert manifest.data.spec == SPEC
        assert manifest.task.num_classes == 4
    total = sum(check_shard(s).train_examples for s in found)
    assert total == sum(4 + i for i in range(5))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_keep_every_example_and_the_client_sizes(tmp_path, scheme):
    natural = build(tmp_path / "n")
    redealt = build(tmp_path / "r", partition=scheme, alpha=0.3, seed=4)

    def images_and_sizes(found):
        rows, sizes = [], []
        for shard in found:
            manifest = shard_format.read_manifest(shard)
            for c in manifest.clients:
                path = shard / shard_format.client_path("train", c.id, manifest.data)
                _, cols = tensor_records.decode(path.read_bytes(), SPEC)
                rows += [bytes(x) for x in cols[0]]
                sizes.append(c.train_examples)
        return sorted(rows), sorted(sizes)

    assert images_and_sizes(natural) == images_and_sizes(redealt)
    ids = {c.id for s in redealt for c in shard_format.read_manifest(s).clients}
    assert all(i.startswith("iid-" if scheme == "iid" else "dir-") for i in ids)


def test_dataframe_and_client_data_sources(tmp_path):
    import pandas as pd
    import tensorflow_federated as tff

    frame = pd.DataFrame(
        {
            "client_id": ["a", "a", "b", "b", "b"],
            "x": [0.5, 1.0, 2.0, 3.0, 4.0],
            "y": [0, 1, 0, 2, 1],
            "text": ["p", "q", "r", "s", "t"],
            "seq": [[1, 2], [3], [4, 5, 6], [], [7]],
        }
    )
    found = client_data.build_shards(frame, tmp_path / "f", workers=2, label_key="y")
    manifest = check_shard(found[0])
    assert element_spec.describe(manifest.data.spec) == (
        "{x: float64[], y: int64[], text: string[], seq: int64[None]}"
    )
    clients = {
        "u1": collections.OrderedDict(a=np.arange(4), b=np.ones((4, 2), np.float32)),
        "u2": collections.OrderedDict(a=np.arange(3), b=np.zeros((3, 2), np.float32)),
    }
    tff_data = tff.simulation.datasets.TestClientData(clients)
    found = client_data.build_shards(tff_data, tmp_path / "t", workers=1, label_key="a")
    manifest = check_shard(found[0])
    assert element_spec.describe(manifest.data.spec) == "{a: int64[], b: float32[2]}"
    assert [c.train_examples for c in manifest.clients] == [4, 3]


def test_unusable_ingest_is_refused_in_one_line(tmp_path):
    rng = np.random.default_rng(2)
    train = {"a": examples(rng, 3), "b": examples(rng, 3)}
    with pytest.raises(UsageError, match="give label_key="):
        client_data.build_shards(train, tmp_path / "x", workers=1, partition="dirichlet")
    with pytest.raises(UsageError, match="label_key 'text/title' is string"):
        client_data.build_shards(train, tmp_path / "x", workers=1, label_key="text/title")
    other = {"a": {"image": np.zeros((2, 4), np.uint8)}, "b": examples(rng, 2)}
    with pytest.raises(UsageError, match="differ in structure"):
        client_data.build_shards(other, tmp_path / "x", workers=1)
    with pytest.raises(UsageError, match="no client-id column 'client_id'"):
        import pandas as pd

        client_data.build_shards(pd.DataFrame({"x": [1]}), tmp_path / "x", workers=1)


def _one_file(shard: Path, split: str = "train") -> Path:
    manifest = shard_format.read_manifest(shard)
    return shard / shard_format.client_path(split, manifest.clients[0].id, manifest.data)


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_damaged_or_mismatched_shards_are_refused_in_one_line(tmp_path):
    shard = build(tmp_path, workers=1)[0]
    path = _one_file(shard)
    data = path.read_bytes()
    path.write_bytes(data[:-3])
    with pytest.raises(ShardError) as e:
        check_shard(shard, deep=False)
    assert _one_line(e).startswith(f"{path}: ") and "truncated" in str(e.value)
    corrupt = bytearray(data)
    corrupt[-1] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    check_shard(shard, deep=False)  # the header is intact
    with pytest.raises(ShardError, match="checksum does not match"):
        check_shard(shard)
    path.write_bytes(data)
    manifest_path = shard / shard_format.MANIFEST_NAME
    body = json.loads(manifest_path.read_text())
    body["data"]["element_spec"]["dict"][0][1]["dtype"] = "uint16"  # the image leaf
    manifest_path.write_text(json.dumps(body))
    with pytest.raises(ShardError) as e:
        check_shard(shard)
    assert "field 'image'" in _one_line(e)


def test_label_out_of_range_is_refused(tmp_path):
    shard = build(tmp_path, workers=1)[0]
    manifest_path = shard / shard_format.MANIFEST_NAME
    body = json.loads(manifest_path.read_text())
    body["task"]["num_classes"] = 2
    manifest_path.write_text(json.dumps(body))
    with pytest.raises(ShardError, match=r"label [23] out of range for 2 classes"):
        check_shard(shard)


def test_v1_shard_is_read_as_emnist_fixed(tmp_path, default_source):
    import tensorflow as tf

    from shared import preprocessing

    shards.write_shards(default_source, [[0, 1]], tmp_path, {"scheme": "test"})
    shard = shards.shard_dir(tmp_path, 0)
    manifest_path = shard / shard_format.MANIFEST_NAME
    body = json.loads(manifest_path.read_text())
    assert body["format_version"] == 2 and body["data"]["encoding"] == "emnist-fixed"
    del body["data"]
    body["format_version"] = 1
    manifest_path.write_text(json.dumps(body))
    manifest = check_shard(shard)
    assert manifest.format_version == 1 and manifest.data == shard_format.EMNIST_FORMAT
    client = default_source.clients[0]
    link = tmp_path / "work"
    link.mkdir()
    (link / "shard").symlink_to(shard)
    import os

    cwd = os.getcwd()
    os.chdir(link)
    try:
        ds = preprocessing.raw_client_dataset(tf.constant(f"{client.id}|0"), "train")
        pixels = np.stack([e["pixels"] for e in ds.as_numpy_iterator()])
    finally:
        os.chdir(cwd)
    assert np.array_equal(pixels, client.train_pixels)
    body["format_version"] = 3
    manifest_path.write_text(json.dumps(body))
    with pytest.raises(ShardError, match="format version 3, this fedcompose reads versions 1, 2"):
        check_shard(shard)


def test_workers_of_different_specs_are_refused_naming_both(tmp_path):
    from coordinator.federation import WorkerDescription, check_consistency
    from shared.errors import FederationError
    from shared.worker_dir import WorkerInfo

    mine = shard_format.read_manifest(build(tmp_path, workers=1)[0])
    other = shard_format.Manifest(
        mine.task, mine.build_id, 1, 2, mine.partition, (), data=shard_format.EMNIST_FORMAT
    )
    with pytest.raises(FederationError) as e:
        check_consistency(
            [
                WorkerDescription("h:1", mine, WorkerInfo()),
                WorkerDescription("h:2", other, WorkerInfo()),
            ]
        )
    text = _one_line(e)
    assert element_spec.describe(SPEC) in text
    assert shard_format.EMNIST_FORMAT.describe() in text


def test_a_shards_dir_of_mixed_specs_is_refused(tmp_path):
    from deploy.local import _same_data

    mine = build(tmp_path / "a", workers=1)[0]
    rng = np.random.default_rng(3)
    theirs = client_data.build_shards(
        {"z": {"image": rng.integers(0, 9, (3, 4)).astype(np.uint8)}}, tmp_path / "b", workers=1
    )[0]
    with pytest.raises(UsageError) as e:
        _same_data([mine, theirs])
    assert "{image: uint8[4]}" in _one_line(e)
