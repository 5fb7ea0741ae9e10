"""What fedcompose processes leave in the system's temporary directory."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import fedcompose, kill_tree, start_fedcompose

AUTOGRAPH = "__autograph_generated_file*.py"


@pytest.mark.slow
def test_a_killed_coordinator_leaves_no_autograph_modules_in_tmpdir(workers2, tmp_path):
    """TensorFlow writes a module per converted function to $TMPDIR and removes
    them only at a normal exit: a coordinator killed mid-run (SIGKILL, OOM)
    left dozens there for good. Now each process keeps them in a directory of
    its own, which the next fedcompose process to start removes."""
    tmpdir, pause = tmp_path / "tmp", tmp_path / "paused"
    tmpdir.mkdir()
    env = {
        **os.environ,
        "TMPDIR": str(tmpdir),
        # An empty cache: the computations are built (and TensorFlow converts
        # functions) in this coordinator.
        "FEDCOMPOSE_CACHE_DIR": str(tmp_path / "cache"),
        "FEDCOMPOSE_PAUSE_AT": "round:2",
        "FEDCOMPOSE_PAUSE_FILE": str(pause),
    }
    addresses = ",".join(w.address for w in workers2)
    coordinator = start_fedcompose(
        "train", "--addresses", addresses, "--rounds", "3", "--eval-every", "0",
        "--run-dir", str(tmp_path / "run"), env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not pause.exists():
            assert coordinator.poll() is None, coordinator.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "round 2 was never reached"
            time.sleep(0.1)
        assert list(tmpdir.rglob(AUTOGRAPH)), "the coordinator converted no function"
    finally:
        kill_tree(coordinator, signal.SIGKILL)
        coordinator.communicate(timeout=60)
    result = fedcompose("status", "--addresses", addresses, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    left = sorted(str(p.relative_to(tmpdir)) for p in tmpdir.rglob("*"))
    assert not left, f"left in $TMPDIR: {left[:5]}"


def test_a_commands_own_temporary_files_go_with_it(tmp_path):
    """Python's temporary files of a command that exits normally leave nothing."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    result = fedcompose("blocks", env={**os.environ, "TMPDIR": str(tmpdir)}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not list(Path(tmpdir).iterdir())
