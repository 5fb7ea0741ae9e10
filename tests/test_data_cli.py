"""`fedcompose data`, run as a user runs it: a subprocess, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from deploy.data import emnist
from shared import shard_format
from tests.conftest import fedcompose
from tests.test_emnist_source import (
    FakeEmnist,
    fake_emnist,  # noqa: F401 - a fixture
    shard_example_counts,
)

ERROR_PREFIX = "fedcompose data: error: "
TF_NOISE = ("tensorflow/", "cuda", "Traceback", "WARNING:absl")
# Any download attempt fails at once: a proxy on a port nobody listens on.
NO_NETWORK = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}


def data(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return fedcompose("data", *args, timeout=120, env=full_env)


def the_error(result: subprocess.CompletedProcess) -> str:
    """The command's one error line; fails if there is not exactly one, or a traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1, result.stderr
    return errors[0][len(ERROR_PREFIX) :]


def emnist_args(db: FakeEmnist, *more: str) -> list[str]:
    return ["--source", "emnist", "--emnist-path", str(db.path), *more]


def test_help_documents_every_option():
    result = data("--help")
    assert result.returncode == 0
    for option in (
        "--source",
        "--emnist-path",
        "--only-digits",
        "--no-only-digits",
        "--workers",
        "--partition",
        "--alpha",
        "--data-seed",
        "--writers",
        "--shards-dir",
        "--force",
    ):
        assert option in result.stdout
    assert "(default: natural)" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0"], "--workers must be >= 1, got 0"),
        (["--partition", "dirichlet", "--alpha", "0"], "--alpha must be > 0, got 0"),
        (["--partition", "dirichlet", "--alpha", "-2"], "--alpha must be > 0, got -2"),
        (["--alpha", "0.3"], "--alpha applies to --partition dirichlet only"),
        (["--data-seed", "-1"], "--data-seed must be >= 0"),
        (["--writers", "0"], "--writers must be >= 1"),
        (["--writers", "5", "--workers", "6"], "--workers 6 is more than the 5 writers"),
        (["--no-only-digits"], "--no-only-digits needs --source emnist"),
        (["--emnist-path", "/somewhere"], "--emnist-path applies to --source emnist only"),
        (["--source", "emnist", "--writers", "10"], "--writers applies to --source default only"),
    ],
)
def test_bad_options_are_refused_up_front(tmp_path, args, message):
    result = data(*args, "--shards-dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert message in the_error(result)
    assert not (tmp_path / "out").exists()


def test_more_shards_than_emnist_writers(fake_emnist, tmp_path):  # noqa: F811
    result = data(
        *emnist_args(fake_emnist, "--workers", "100", "--shards-dir", str(tmp_path / "o"))
    )
    assert result.returncode == 2
    writers = len(fake_emnist.writers())
    assert f"--workers 100 is more than the {writers} writers" in the_error(result)


def test_non_empty_out_needs_force(tmp_path):
    out = tmp_path / "out"
    (out / "shard-000").mkdir(parents=True)
    result = data("--shards-dir", str(out))
    assert result.returncode == 2
    assert f"--shards-dir {out} is not empty; pass --force" in the_error(result)


def test_force_does_not_replace_files_it_did_not_make(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    result = data("--shards-dir", str(out), "--force")
    assert result.returncode == 2
    assert "'thesis.tex'" in the_error(result)
    assert (out / "thesis.tex").exists()


def test_out_that_is_a_file(tmp_path):
    out = tmp_path / "out"
    out.write_text("")
    result = data("--shards-dir", str(out))
    assert result.returncode == 2
    assert "is not a directory" in the_error(result)


def test_missing_emnist_without_network_says_where_to_put_it(tmp_path):
    cache = tmp_path / "cache"
    result = data(
        "--source", "emnist", "--emnist-path", str(cache), "--shards-dir", str(tmp_path / "o"),
        env=NO_NETWORK,
    )  # fmt: skip
    assert result.returncode == 3
    message = the_error(result)
    expected = cache / emnist.FILE_NAME
    assert "could not be downloaded" in message
    assert f"put {emnist.FILE_NAME} at {expected}" in message
    assert not cache.exists(), "a failed download must leave nothing behind"


def test_corrupt_emnist_file(tmp_path):
    db = tmp_path / emnist.FILE_NAME
    db.write_bytes(b"\x00garbage" * 1000)
    result = data(
        "--source", "emnist", "--emnist-path", str(db), "--shards-dir", str(tmp_path / "o")
    )
    assert result.returncode == 3
    assert the_error(result) == f"{db}: not an SQLite database"


def test_builds_emnist_shards_and_summarises_them(fake_emnist, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    result = data(*emnist_args(fake_emnist, "--workers", "3", "--shards-dir", str(out)))
    assert result.returncode == 0, result.stderr
    for noise in TF_NOISE:
        assert noise not in result.stderr, result.stderr

    shard_dirs = sorted(out.glob("shard-*"))
    assert [d.name for d in shard_dirs] == ["shard-000", "shard-001", "shard-002"]
    assert shard_example_counts(shard_dirs) == fake_emnist.example_counts()
    manifests = [shard_format.read_manifest(d) for d in shard_dirs]
    info = manifests[0].partition
    assert info["scheme"] == "natural"
    assert info["writers_left_out"] == 1
    assert manifests[0].task.num_classes == 10

    summary = result.stdout
    assert f"3 shards in {out}" in summary
    for manifest in manifests:
        row = f"shard-{manifest.shard_index:03d} {len(manifest.clients):>9}"
        assert row + f"{manifest.train_examples:>10}{manifest.test_examples:>9}" in summary
    train = sum(m.train_examples for m in manifests)
    clients = sum(len(m.clients) for m in manifests)
    assert f"{'total':<10}{clients:>9}{train:>10}" in summary
    assert "labels (train + test, all shards):" in summary
    assert "left out: 1 writer(s) without training examples" in summary


@pytest.mark.slow
def test_force_rebuilds_with_another_partition(fake_emnist, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    first = data(*emnist_args(fake_emnist, "--workers", "4", "--shards-dir", str(out)))
    assert first.returncode == 0, first.stderr
    again = data(
        *emnist_args(fake_emnist, "--no-only-digits", "--partition", "dirichlet", "--alpha", "0.2"),
        "--data-seed", "7", "--workers", "2", "--shards-dir", str(out), "--force",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr

    shard_dirs = sorted(out.glob("shard-*"))
    assert [d.name for d in shard_dirs] == ["shard-000", "shard-001"]
    assert shard_example_counts(shard_dirs) == fake_emnist.example_counts(only_digits=False)
    manifest = shard_format.read_manifest(shard_dirs[0])
    assert manifest.task.num_classes == 62
    assert (manifest.partition["scheme"], manifest.partition["alpha"]) == ("dirichlet", 0.2)
    assert manifest.partition["seed"] == 7
    assert all(c.id.startswith("dir-") for c in manifest.clients)
    recorded = json.loads((out / "data-spec.json").read_text())
    assert recorded["spec"]["partition"] == "dirichlet"
    assert " A " in again.stdout, "62-class labels are shown as letters"


def test_default_source_goes_through_the_same_command(tmp_path):
    out = tmp_path / "out"
    result = data(
        "--writers", "12", "--workers", "2", "--partition", "iid", "--shards-dir", str(out)
    )
    assert result.returncode == 0, result.stderr
    manifests = [shard_format.read_manifest(d) for d in sorted(out.glob("shard-*"))]
    assert sum(len(m.clients) for m in manifests) == 12
    assert manifests[0].task.dataset == "sklearn-digits"
    assert "2 shards in" in result.stdout
