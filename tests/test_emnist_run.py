"""A federated run on data in TFF's exact EMNIST schema, end to end: the
database is written by TFF's own writer, sharded by `fedcompose data`, served
by two workers and trained on with held-out evaluation."""

from __future__ import annotations

import json

import pytest

from deploy.data import default_data
from tests.conftest import fedcompose
from tests.test_emnist_source import ALL_SPLITS, DIGIT_SPLITS, write_emnist_db


def _digits_as_emnist_db(directory, num_writers: int = 30):
    """Real handwritten digits (sklearn's), stored as an emnist_all.sqlite."""
    source = default_data.load(num_writers=num_writers)
    train = {
        f"f{i:04d}_{i % 7:02d}": (c.train_pixels, c.train_labels.astype("int64"))
        for i, c in enumerate(source)
    }
    test = {
        f"f{i:04d}_{i % 7:02d}": (c.test_pixels, c.test_labels.astype("int64"))
        for i, c in enumerate(source)
    }
    directory.mkdir(parents=True)
    path = directory / "emnist_all.sqlite"
    splits = {
        DIGIT_SPLITS[0]: train,
        DIGIT_SPLITS[1]: test,
        ALL_SPLITS[0]: train,
        ALL_SPLITS[1]: test,
    }
    write_emnist_db(path, splits)
    return path, sum(len(v[1]) for v in test.values())


@pytest.mark.slow
def test_emnist_schema_run_over_two_workers_with_evaluation(tmp_path):
    db, test_examples = _digits_as_emnist_db(tmp_path / "emnist")
    shards = tmp_path / "shards"
    made = fedcompose(
        "data", "--source", "emnist", "--emnist-path", str(db), "--workers", "2",
        "--shards-dir", str(shards), check=True,
    )  # fmt: skip
    assert "shard-000" in made.stdout + made.stderr
    run_dir = tmp_path / "run"
    fedcompose(
        "run", "--shards-dir", str(shards), "--rounds", "8", "--clients-per-round", "8",
        "--eval-every", "4", "--run-dir", str(run_dir), check=True,
    )  # fmt: skip
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval"] for r in rows if "eval" in r]
    assert [r["round"] for r in rows if "eval" in r] == [4, 8]
    assert all(e["examples"] == test_examples for e in evals)
    assert evals[-1]["accuracy"] > 0.5 and evals[-1]["loss"] < evals[0]["loss"]
    assert all(len(r["workers"]) <= 2 for r in rows)
    manifest = json.loads((shards / "shard-000" / "manifest.json").read_text())
    assert manifest["task"]["dataset"] == "emnist-digits"
