"""A killed coordinator resumes from its last checkpoint to the same model."""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest

from tests.conftest import fedcompose, kill_tree, start_fedcompose
from tests.fault_tools import Pause

ARGS = ("--rounds", "6", "--eval-every", "3", "--workers", "2")


def _status(run_dir) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_uninterrupted_result(tmp_path):
    straight = tmp_path / "straight"
    fedcompose("run", *ARGS, "--run-dir", str(straight), check=True)

    resumed = tmp_path / "resumed"
    # Held at round 4's start, so the kill lands mid-run however fast the
    # rounds are; the record writer runs on and checkpoints round 3.
    pause = Pause(tmp_path, "round:4")
    proc = start_fedcompose("run", *ARGS, "--run-dir", str(resumed), env=pause.env)
    try:
        pause.wait(proc)
        deadline = time.monotonic() + 300
        while not (resumed / "checkpoints" / "round_3").is_dir():
            assert time.monotonic() < deadline, "round 3 was never checkpointed"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # the coordinator only: its workers must follow
        proc.wait(timeout=30)
    finally:
        pause.release()
        kill_tree(proc)
    checkpoints = [int(p.name.split("_")[1]) for p in (resumed / "checkpoints").glob("round_*")]
    killed_after = max(checkpoints)
    assert killed_after == 3
    # status.json is written about once a second while rounds run: a SIGKILL
    # can leave it behind the files (the next start sets it from them).
    assert _status(resumed)["completed_rounds"] <= killed_after

    result = fedcompose("run", *ARGS, "--run-dir", str(resumed), check=True)
    assert f"resuming {resumed} after round {killed_after}" in result.stderr
    assert "round    1 " not in result.stderr
    assert f"round {killed_after + 1:>4} " in result.stderr

    a, b = np.load(straight / "final_model.npz"), np.load(resumed / "final_model.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6)
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5, 6]
    csv_rounds = [
        line.split(",")[0] for line in (resumed / "metrics.csv").read_text().splitlines()[1:]
    ]
    assert csv_rounds == ["1", "2", "3", "4", "5", "6"]

    # A finished run is not re-run by accident.
    again = fedcompose("run", *ARGS, "--run-dir", str(resumed), check=True)
    assert "already finished 6 rounds; nothing to do" in again.stderr
    assert len((resumed / "metrics.jsonl").read_text().splitlines()) == 6


@pytest.mark.slow
def test_resume_with_other_settings_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    fedcompose("run", "--rounds", "2", "--workers", "2", "--run-dir", str(run_dir), check=True)
    result = fedcompose(
        "run", "--rounds", "4", "--workers", "2", "--model", "cnn", "--run-dir", str(run_dir)
    )
    assert result.returncode == 5
    assert "holds a run with other settings (model.model: 'linear' -> 'cnn')" in result.stderr

    # A checkpoint whose structure does not fit the model is refused too, even
    # when the recorded config was edited to match.
    config = run_dir / "config.toml"
    config.write_text(config.read_text().replace('model = "linear"', 'model = "cnn"'))
    result = fedcompose(
        "run", "--rounds", "4", "--workers", "2", "--model", "cnn", "--run-dir", str(run_dir)
    )
    assert result.returncode == 5
    assert "does not fit the configured model and algorithm" in result.stderr
    assert "Traceback" not in result.stderr
