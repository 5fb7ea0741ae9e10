"""Reading TFF's federated EMNIST: the real ingestion path on small databases.

The databases are written by TFF's own `save_to_sql_client_data`, so they have
exactly the schema and serialization of `emnist_all.sqlite`; TFF's own reader
(`tff.simulation.datasets.emnist.load_data`) is the oracle for their contents.

The builders here are imported by test_partition.py and test_data_cli.py.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import shutil
import sqlite3
import struct
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from deploy.data import build, emnist
from deploy.data.sources import DataSourceError
from shared import shard_format
from shared.config import DataConfig

Examples = tuple[np.ndarray, np.ndarray]  # pixels [n, 28, 28] float32, labels [n] int64

DIGIT_SPLITS = ("digits_only_train", "digits_only_test")
ALL_SPLITS = ("all_train", "all_test")
# Repeated sizes give the balanced assignment ties for its seed to break.
TRAIN_SIZES = (3, 5, 8, 8, 8, 12, 12, 20, 30)
LARGE_WRITER = 45
TEST_ONLY_WRITER = "f9999_00"


@dataclasses.dataclass
class FakeEmnist:
    """An emnist_all.sqlite in TFF's schema and what went into it."""

    path: Path
    splits: dict[str, dict[str, Examples]]

    def writers(self, only_digits: bool = True) -> dict[str, tuple[Examples, Examples | None]]:
        """Writers with training examples: what a source must hold."""
        train_split, test_split = DIGIT_SPLITS if only_digits else ALL_SPLITS
        train, test = self.splits[train_split], self.splits[test_split]
        return {w: (train[w], test.get(w)) for w in sorted(train)}

    def example_counts(self, only_digits: bool = True) -> dict[str, Counter]:
        counts = {"train": Counter(), "test": Counter()}
        for train, test in self.writers(only_digits).values():
            counts["train"].update(example_hashes(*train))
            if test is not None:
                counts["test"].update(example_hashes(*test))
        return counts


def random_examples(rng: np.random.Generator, n: int, num_classes: int) -> Examples:
    pixels = rng.random((n, 28, 28), dtype=np.float32)
    pixels[:, :2] = 1.0  # EMNIST's background, exactly representable
    return pixels, rng.integers(0, num_classes, n).astype(np.int64)


def random_split_pair(
    rng: np.random.Generator, num_writers: int, num_classes: int, prefix: str = "f"
) -> tuple[dict[str, Examples], dict[str, Examples]]:
    """Writers' train and test examples in EMNIST's id style (`f0012_34`).

    One writer is much larger than the rest, some have no test examples, and
    one has only test examples (so must be left out).
    """
    train: dict[str, Examples] = {}
    test: dict[str, Examples] = {}
    for w in range(num_writers):
        writer = f"{prefix}{w:04d}_{w % 7:02d}"
        size = LARGE_WRITER if w == 1 else int(rng.choice(TRAIN_SIZES))
        train[writer] = random_examples(rng, size, num_classes)
        held_out = int(rng.integers(0, 5))
        if held_out:
            test[writer] = random_examples(rng, held_out, num_classes)
    test[TEST_ONLY_WRITER] = random_examples(rng, 3, num_classes)
    return train, test


def save_split_with_tff(path: Path, split: str, writers: dict[str, Examples]) -> None:
    import tensorflow as tf
    import tensorflow_federated as tff

    def dataset_fn(writer: str) -> tf.data.Dataset:
        pixels, labels = writers[writer]
        return tf.data.Dataset.from_tensor_slices(
            collections.OrderedDict(label=labels.astype(np.int64), pixels=pixels)
        )

    ids = sorted(writers)
    tff.simulation.datasets.save_to_sql_client_data(
        ids, dataset_fn, str(path), split_names_by_client_id=dict.fromkeys(ids, split)
    )


def write_emnist_db(path: Path, splits: dict[str, dict[str, Examples]]) -> None:
    """One database with every split, like emnist_all.sqlite.

    TFF's writer puts each client id in one split; the real file has each
    writer in a train and a test split, so splits are written separately and
    their rows merged into one file with TFF's tables.
    """
    parts = []
    for split, writers in splits.items():
        part = path.with_name(f"{path.stem}.{split}.part")
        save_split_with_tff(part, split, writers)
        parts.append(part)
    shutil.copyfile(parts[0], path)
    with sqlite3.connect(path) as conn:
        for part in parts[1:]:
            conn.execute("ATTACH DATABASE ? AS part", (str(part),))
            conn.execute("INSERT INTO examples SELECT * FROM part.examples")
            conn.execute("INSERT INTO client_metadata SELECT * FROM part.client_metadata")
            conn.commit()
            conn.execute("DETACH DATABASE part")
    for part in parts:
        part.unlink()


def build_fake_emnist(directory: Path, num_writers: int = 30, seed: int = 0) -> FakeEmnist:
    rng = np.random.default_rng(seed)
    digits_train, digits_test = random_split_pair(rng, num_writers, 10)
    all_train, all_test = random_split_pair(rng, num_writers + 4, 62)
    splits = {
        DIGIT_SPLITS[0]: digits_train,
        DIGIT_SPLITS[1]: digits_test,
        ALL_SPLITS[0]: all_train,
        ALL_SPLITS[1]: all_test,
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / emnist.FILE_NAME
    write_emnist_db(path, splits)
    return FakeEmnist(path=path, splits=splits)


@pytest.fixture(scope="session")
def fake_emnist(tmp_path_factory) -> FakeEmnist:
    return build_fake_emnist(tmp_path_factory.mktemp("emnist"))


def example_hashes(pixels: np.ndarray, labels: np.ndarray) -> list[str]:
    pixels = np.asarray(pixels, dtype="<f4").reshape(len(labels), shard_format.PIXELS)
    return [
        hashlib.sha1(p.tobytes() + struct.pack("<i", int(label))).hexdigest()
        for p, label in zip(pixels, labels, strict=True)
    ]


def read_shards(shard_dirs: list[Path]) -> dict[str, dict[str, Examples]]:
    """split -> client -> examples, read back from shard files; clients must be unique."""
    found: dict[str, dict[str, Examples]] = {"train": {}, "test": {}}
    for shard_dir in shard_dirs:
        manifest = shard_format.read_manifest(shard_dir)
        for client in manifest.clients:
            for split in shard_format.SPLITS:
                assert client.id not in found[split], f"{client.id} is in two shards"
                path = shard_dir / shard_format.client_path(split, client.id)
                found[split][client.id] = shard_format.decode_records(path.read_bytes(), str(path))
    return found


def shard_example_counts(shard_dirs: list[Path]) -> dict[str, Counter]:
    counts = {}
    for split, clients in read_shards(shard_dirs).items():
        counts[split] = Counter(h for ex in clients.values() for h in example_hashes(*ex))
    return counts


def tff_reads(path: Path, only_digits: bool) -> dict[str, dict[str, Counter]]:
    """What TFF's own reader finds in the file: split -> writer -> example hashes."""
    import tensorflow_federated as tff

    train, test = tff.simulation.datasets.emnist.load_data(
        only_digits=only_digits, cache_dir=str(path.parent)
    )
    found = {}
    for split, data in (("train", train), ("test", test)):
        found[split] = {}
        for writer in data.client_ids:
            batch = next(iter(data.create_tf_dataset_for_client(writer).batch(10_000)))
            found[split][writer] = Counter(
                example_hashes(batch["pixels"].numpy(), batch["label"].numpy())
            )
    return found


# --- reading ---------------------------------------------------------------------------


@pytest.mark.parametrize("only_digits", [True, False])
def test_reads_what_tff_reads_with_each_writer_as_one_client(fake_emnist, only_digits):
    source = emnist.load(fake_emnist.path, only_digits=only_digits)
    oracle = tff_reads(fake_emnist.path, only_digits)

    trained = sorted(oracle["train"])
    assert [c.id for c in source.clients] == trained
    assert source.num_classes == (10 if only_digits else 62)
    assert source.dataset == ("emnist-digits" if only_digits else "emnist-all")
    for client in source.clients:
        assert (
            Counter(example_hashes(client.train_pixels, client.train_labels))
            == (oracle["train"][client.id])
        )
        assert Counter(example_hashes(client.test_pixels, client.test_labels)) == (
            oracle["test"].get(client.id, Counter())
        )
        assert client.train_pixels.dtype == np.float32
        assert client.train_pixels.shape[1:] == (28, 28)
    assert source.writers_left_out == 1
    assert source.examples_left_out == sum(oracle["test"][TEST_ONLY_WRITER].values())


def test_keeps_each_writers_examples_in_stored_order(fake_emnist):
    source = emnist.load(fake_emnist.path)
    expected = fake_emnist.writers()
    for client in source.clients:
        (train_pixels, train_labels), test = expected[client.id]
        np.testing.assert_array_equal(client.train_pixels, train_pixels)
        np.testing.assert_array_equal(client.train_labels, train_labels)
        if test is None:
            assert client.num_test == 0
        else:
            np.testing.assert_array_equal(client.test_pixels, test[0])


def test_clients_are_views_of_one_pool_per_split(fake_emnist):
    source = emnist.load(fake_emnist.path)
    pool = source.pooled("train")
    assert len(pool) == source.train_examples
    for client in source.clients:
        assert np.shares_memory(client.train_pixels, pool.pixels)


def test_path_may_be_the_file_or_its_directory(fake_emnist):
    by_dir = emnist.survey(fake_emnist.path.parent)
    by_file = emnist.survey(fake_emnist.path)
    assert by_dir == by_file
    assert by_file.writers == len(fake_emnist.writers())
    assert by_file.writers_left_out == 1


def test_survey_matches_a_full_read(fake_emnist):
    survey = emnist.survey(fake_emnist.path, only_digits=False)
    source = emnist.load(fake_emnist.path, only_digits=False)
    assert survey.writers == len(source.clients)
    assert survey.train_examples == source.train_examples
    assert survey.test_examples == source.test_examples


def test_natural_shards_hold_every_example_exactly_once(fake_emnist, tmp_path):
    spec = DataConfig(source="emnist", emnist_path=str(fake_emnist.path))
    shard_dirs = build.build_shards(spec, tmp_path / "shards", 3)

    assert shard_example_counts(shard_dirs) == fake_emnist.example_counts()
    partition = shard_format.read_manifest(shard_dirs[0]).partition
    assert partition["scheme"] == "natural"
    assert partition["writers_left_out"] == 1
    assert "TFF federated EMNIST" in partition["source_description"]


def test_metadata_that_disagrees_with_the_examples_falls_back_to_counting(
    fake_emnist, tmp_path, caplog
):
    path = tmp_path / emnist.FILE_NAME
    shutil.copyfile(fake_emnist.path, path)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE client_metadata SET num_examples = num_examples + 2")
    source = emnist.load(path)
    assert {c.id: c.num_train for c in source.clients} == {
        w: len(train[1]) for w, (train, _) in fake_emnist.writers().items()
    }
    assert "counting the examples" in caplog.text


# --- bad sources -----------------------------------------------------------------------


def assert_one_line_naming(error: pytest.ExceptionInfo, path: Path, *phrases: str) -> str:
    message = str(error.value)
    assert "\n" not in message
    assert str(path) in message
    for phrase in phrases:
        assert phrase in message, message
    return message


def test_missing_file_without_network_says_where_to_put_it(tmp_path, monkeypatch):
    def no_network(*_args, **_kwargs):
        raise urllib.error.URLError("network unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    cache = tmp_path / "cache"
    with pytest.raises(DataSourceError) as error:
        emnist.load(cache)
    expected = cache / emnist.FILE_NAME
    message = assert_one_line_naming(error, expected, "missing", "could not be downloaded")
    assert f"put {emnist.FILE_NAME} at {expected}" in message
    assert not cache.exists(), "a failed download must leave nothing behind"


def test_missing_file_under_another_name(tmp_path):
    path = tmp_path / "mine.sqlite"
    with pytest.raises(DataSourceError) as error:
        emnist.load(path)
    assert_one_line_naming(error, path, "no such file")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "empty file"),
        (b"PK\x03\x04 this is a zip archive, not a database" * 100, "not an SQLite database"),
    ],
)
def test_not_a_database(tmp_path, content, problem):
    path = tmp_path / emnist.FILE_NAME
    path.write_bytes(content)
    with pytest.raises(DataSourceError) as error:
        emnist.load(path)
    assert_one_line_naming(error, path, problem)


@pytest.mark.parametrize("keep", ["half, whole pages", "half, mid-page"])
def test_truncated_database(fake_emnist, tmp_path, keep):
    data = fake_emnist.path.read_bytes()
    cut = len(data) // 2
    cut = cut - cut % 4096 if keep == "half, whole pages" else cut + 7
    path = tmp_path / emnist.FILE_NAME
    path.write_bytes(data[:cut])
    with pytest.raises(DataSourceError) as error:
        emnist.survey(path)
    assert_one_line_naming(error, path, "truncated")


def test_damaged_pages_fail_the_read_with_one_line(fake_emnist, tmp_path):
    data = bytearray(fake_emnist.path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 20000] = np.random.default_rng(0).bytes(20000)
    path = tmp_path / emnist.FILE_NAME
    path.write_bytes(bytes(data))
    with pytest.raises(DataSourceError) as error:
        emnist.load(path)
    assert_one_line_naming(error, path)


def make_db(path: Path, *statements: str) -> Path:
    with sqlite3.connect(path) as conn:
        for statement in statements:
            conn.execute(statement)
    return path


@pytest.mark.parametrize(
    ("statements", "problem"),
    [
        (
            ["CREATE TABLE examples (split_name TEXT, client_id TEXT, serialized_example_proto)"],
            "table 'client_metadata' is missing",
        ),
        (
            [
                "CREATE TABLE examples (split_name TEXT, client_id TEXT, pixels BLOB)",
                "CREATE TABLE client_metadata (client_id TEXT, split_name TEXT, num_examples)",
            ],
            "lacks column(s) serialized_example_proto",
        ),
        (
            [
                "CREATE TABLE examples (split_name TEXT, client_id TEXT, serialized_example_proto)",
                "CREATE TABLE client_metadata (client_id TEXT, split_name TEXT, num_examples)",
            ],
            "no training examples in split 'digits_only_train'",
        ),
    ],
)
def test_wrong_schema(tmp_path, statements, problem):
    path = make_db(tmp_path / emnist.FILE_NAME, *statements)
    with pytest.raises(DataSourceError) as error:
        emnist.load(path)
    assert_one_line_naming(error, path, "not TFF's federated EMNIST", problem)


def test_records_of_another_shape(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / emnist.FILE_NAME
    small = {"f0000_00": (rng.random((4, 14, 14), dtype=np.float32), np.arange(4))}
    write_emnist_db(path, {DIGIT_SPLITS[0]: small})
    with pytest.raises(DataSourceError) as error:
        emnist.load(path)
    assert_one_line_naming(error, path, "not EMNIST examples")


def test_label_outside_the_variant(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / emnist.FILE_NAME
    letters = {"f0000_00": random_examples(rng, 4, 10)}
    letters["f0000_00"][1][2] = 40  # a letter in the digits-only split
    write_emnist_db(path, {DIGIT_SPLITS[0]: letters})
    with pytest.raises(DataSourceError) as error:
        emnist.load(path)
    assert_one_line_naming(error, path, "label 40", "0..9")


def test_writer_ids_that_cannot_name_files_get_safe_distinct_ones():
    assert emnist.file_safe_id("f0123_45") == "f0123_45"
    odd = ["a/b", "a b", "../etc", "ü", "x" * 200]
    safe = [emnist.file_safe_id(w) for w in odd]
    assert len(set(safe)) == len(odd)
    shard_format.check_client_ids(safe)
