"""End-to-end runs on the default data: learning happens, outputs are written,
and the coordinator works from worker addresses alone."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, fedcompose


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ten_rounds_lower_loss_and_raise_accuracy(tmp_path):
    run_dir = tmp_path / "run"
    result = fedcompose(
        "run", "--rounds", "10", "--eval-every", "5", "--run-dir", str(run_dir), check=True
    )
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == list(range(1, 11))
    first, last = rows[:3], rows[-3:]
    mean = lambda rs, k: sum(r["train"][k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "loss") < mean(first, "loss") - 0.3
    assert mean(last, "accuracy") > mean(first, "accuracy") + 0.2
    evals = [r["eval"] for r in rows if "eval" in r]
    assert len(evals) == 2 and evals[1]["accuracy"] > evals[0]["accuracy"]
    assert evals[1]["loss"] < evals[0]["loss"]
    # Every writer's held-out examples were evaluated where they live.
    assert evals[1]["examples"] == 360
    # The per-round lines and the final summary reach the user.
    assert re.search(r"round +10 +clients +10 +examples +\d+ +loss", result.stderr)
    assert "held-out accuracy" in result.stderr
    # TF's start-up noise stays out of the terminal.
    assert "cpu_feature_guard" not in result.stderr and "grappler" not in result.stderr

    # Outputs a researcher keeps: one entry per round in each.
    csv_lines = (run_dir / "metrics.csv").read_text().strip().splitlines()
    assert csv_lines[0].startswith("round,") and len(csv_lines) == 11
    assert (run_dir / "metrics.png").stat().st_size > 10_000
    assert (run_dir / "final_model.npz").exists()
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(
        str(run_dir / "tensorboard"), size_guidance={event_accumulator.TENSORS: 0}
    )
    events.Reload()
    assert len(events.Tensors("train/loss")) == 10
    assert len(events.Tensors("eval/accuracy")) == 2
    for i in range(3):
        assert "ready: serving" in (run_dir / "logs" / f"worker-{i}.log").read_text()


@pytest.mark.slow
def test_coordinator_never_touches_shard_files(workers2, shards2, tmp_path):
    """Traces every file-system call of the coordinator and its children."""
    # A failure, not a skip: without strace this check would pass unseen.
    assert shutil.which("strace"), "needs strace (deploy/test.sh installs it)"
    shard_root = shards2[0].parent.resolve()
    trace = tmp_path / "trace.txt"
    run_dir = tmp_path / "run"
    cmd = [
        "strace",
        # Stops only at the traced calls, not at every system call (2-3x faster).
        "--seccomp-bpf",
        "-f",
        "-qq",
        "-e",
        "trace=%file",
        "-o",
        str(trace),
        sys.executable,
        "-m",
        "deploy.cli",
        "train",
        "--addresses",
        ",".join(w.address for w in workers2),
        "--rounds",
        "2",
        "--eval-every",
        "1",
        "--run-dir",
        str(run_dir),
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(_rows(run_dir)) == 2
    traced = trace.read_text()
    assert "openat(" in traced and len(traced.splitlines()) > 1000, "the trace must be real"
    assert str(shard_root) not in traced
    assert "/train/writer_" not in traced and "manifest.json" not in traced
