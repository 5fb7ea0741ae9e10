"""Non-finite values are never dropped without a word (issue 11, item 4).

A NaN pixel in one client's file (past `--shard-check quick`), a NaN in a test
file, a diverging learning rate: the run either stops with one line naming the
round, the client and its worker (`--on-non-finite fail`, the default, exit
code 6), or (`drop`) leaves the client out, says which in the terminal and the
log, and reports the train loss over the finite clients.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from shared import shard_format
from tests.conftest import build_default_shards, fedcompose

pytestmark = pytest.mark.slow


def _round_one_client(shards: list[Path]) -> str:
    from coordinator import federation

    ids = sorted(c.id for s in shards for c in shard_format.read_manifest(s).clients)
    return federation.sample_clients(ids, 1, 10, 0)[0]


def _poison(shards: list[Path], client: str, split: str, value: float = np.nan) -> None:
    for shard in shards:
        path = shard / split / f"{client}{shard_format.CLIENT_SUFFIX}"
        if path.exists():
            data = bytearray(path.read_bytes())
            data[4 * 100 : 4 * 101] = np.array([value], "<f4").tobytes()
            path.write_bytes(bytes(data))
            return
    raise AssertionError(f"{client} not found")


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run(shards: list[Path], run_dir: Path, *args: str):
    return fedcompose(
        "run",
        "--shards-dir",
        str(shards[0].parent),
        "--shard-check",
        "quick",
        "--run-dir",
        str(run_dir),
        *args,
        timeout=600,
    )


def test_a_nan_pixel_stops_the_run_naming_the_client(tmp_path):
    shards = build_default_shards(tmp_path / "shards", 2)
    client = _round_one_client(shards)
    _poison(shards, client, "train")
    run_dir = tmp_path / "run"
    result = _run(shards, run_dir, "--rounds", "3")
    assert result.returncode == 6, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("fedcompose run: error: round 1: 1 client update(s) not finite")
    assert f"client {client} on worker " in last and "loss nan" in last
    assert "--on-non-finite drop" in last
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["completed_rounds"] == 0
    assert client in status["error"]
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())


def test_drop_leaves_the_client_out_says_so_and_reports_finite_figures(tmp_path):
    shards = build_default_shards(tmp_path / "shards", 2)
    client = _round_one_client(shards)
    _poison(shards, client, "train")
    test_client = shard_format.read_manifest(shards[1]).clients[0].id
    _poison(shards, test_client, "test", np.inf)
    run_dir = tmp_path / "run"
    result = _run(shards, run_dir, "--rounds", "3", "--eval-every", "1", "--on-non-finite", "drop")
    assert result.returncode == 0, result.stderr[-2000:]
    warning = f"round 1: 1 client update(s) not finite: client {client} on worker"
    assert warning in result.stderr
    assert warning in (run_dir / "logs" / "coordinator.log").read_text()
    assert f"the held-out loss is not finite: client {test_client} on worker" in result.stderr
    assert f"leave out 1 client(s): {test_client}" in result.stderr
    rows = _rows(run_dir)
    first = rows[0]
    assert first["dropped_clients"] == 1 and first["dropped_examples"] > 0
    assert math.isfinite(first["train"]["loss"]) and first["examples"] > 0
    assert all(math.isfinite(r["eval"]["loss"]) for r in rows)
    assert all(r["eval"]["left_out_clients"] == 1 for r in rows)
    assert "dropped 1" in result.stderr  # the round line says it too
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"


def test_a_diverging_learning_rate_fails_or_is_reported_every_round(tmp_path):
    shards = build_default_shards(tmp_path / "shards", 2)
    result = _run(shards, tmp_path / "fail", "--rounds", "2", "--client-learning-rate", "3e38")
    assert result.returncode == 6, result.stderr[-2000:]
    assert "round 1: 10 client update(s) not finite" in result.stderr.splitlines()[-1]

    result = _run(
        shards,
        tmp_path / "drop",
        "--rounds",
        "2",
        "--eval-every",
        "0",
        "--client-learning-rate",
        "3e38",
        "--on-non-finite",
        "drop",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        "round 1: the aggregated update was not finite, so the server left the model"
        in result.stderr
    )
    rows = _rows(tmp_path / "drop")
    assert all(r["update_non_finite"] == 1 and r["dropped_clients"] == 10 for r in rows)
    # No client was finite, so there is no train figure (not a made-up 0).
    assert all(r["train"]["loss"] is None for r in rows)
    assert "loss n/a" in result.stderr


def test_a_non_finite_model_always_stops_the_run(tmp_path):
    shards = build_default_shards(tmp_path / "shards", 2)
    run_dir = tmp_path / "run"
    flags = ["--client-work", "model_delta", "--server-learning-rate", "3e38"]
    result = _run(
        shards, run_dir, "--rounds", "3", *flags, "--client-learning-rate", "10",
        "--on-non-finite", "drop",
    )  # fmt: skip
    assert result.returncode == 6, result.stderr[-2000:]
    last = result.stderr.splitlines()[-1]
    assert "round 1: the server model or optimizer state became non-finite" in last
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["completed_rounds"] == 0


def test_a_model_extreme_everywhere_stops_the_run_at_evaluation(tmp_path):
    """Finite but huge weights: every client's held-out loss is NaN. Leaving every
    client out would leave nothing to report, so the run stops even with drop."""
    shards = build_default_shards(tmp_path / "shards", 2)
    flags = ["--client-work", "model_delta", "--server-learning-rate", "3e38"]
    result = _run(
        shards, tmp_path / "run", "--rounds", "1", *flags, "--client-learning-rate", "1.0",
        "--on-non-finite", "drop",
    )  # fmt: skip
    assert result.returncode == 6, result.stderr[-2000:]
    assert "held-out loss is not finite on every client" in result.stderr.splitlines()[-1]
