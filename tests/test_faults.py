"""The real command line against faults: concurrent use of one run directory,
resumes on other data, damaged checkpoints, full disks, and signals at each
phase of a run. Each asserts one error line, a meaningful exit code, a run
directory that is untouched or consistent (and resumes to the result of an
uninterrupted run), and no process left behind (the autouse guard)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from deploy import workers as workers_lib
from deploy.data import build
from shared.config import DataConfig
from tests.conftest import fedcompose, kill_tree, start_fedcompose
from tests.fault_tools import (
    Pause,
    assert_consistent,
    assert_one_line_error,
    checkpoints,
    communicate_or_explain,
    csv_rounds,
    fill,
    metric_rounds,
    snapshot,
    status,
    temporaries,
    tmpfs,
    wait_recorded,
)

pytestmark = pytest.mark.slow

ROUNDS = 6
TRAIN = ("--rounds", str(ROUNDS), "--eval-every", "2", "--rpc-timeout", "60")


def _same_model(a: Path, b: Path) -> None:
    x, y = np.load(a / "final_model.npz"), np.load(b / "final_model.npz")
    assert sorted(x.files) == sorted(y.files)
    for key in x.files:
        np.testing.assert_allclose(x[key], y[key], rtol=0, atol=1e-6)


def _finished_cleanly(run_dir: Path, rounds: int = ROUNDS) -> None:
    assert_consistent(run_dir, "finished")
    assert metric_rounds(run_dir) == list(range(1, rounds + 1))
    assert csv_rounds(run_dir) == list(range(1, rounds + 1))
    assert "error" not in status(run_dir)
    assert temporaries(run_dir) == []


@pytest.fixture(scope="module")
def reference(shards2, tmp_path_factory) -> Path:
    """An uninterrupted run over shards2: what every resumed run must equal."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    fedcompose(
        "run", "--shards-dir", str(shards2[0].parent), *TRAIN, "--run-dir", str(run_dir),
        check=True,
    )  # fmt: skip
    return run_dir


def _addresses(workers) -> str:
    return ",".join(w.address for w in workers)


def _train(workers, run_dir: Path, *extra: str, **kwargs):
    return fedcompose(
        "train", "--addresses", _addresses(workers), *TRAIN, "--run-dir", str(run_dir),
        *extra, **kwargs,
    )  # fmt: skip


def _start_train(workers, run_dir: Path, pause: Pause) -> subprocess.Popen:
    return start_fedcompose(
        "train", "--addresses", _addresses(workers), *TRAIN, "--run-dir", str(run_dir),
        env=pause.env,
    )  # fmt: skip


def _executor(worker) -> psutil.Process:
    return next(
        c
        for c in psutil.Process(worker.process.pid).children()
        if "worker_binary" in " ".join(c.cmdline())
    )


# --- one run directory, two coordinators ---------------------------------------------


def _settled(run_dir: Path, quiet: float = 1.5, timeout: float = 20.0) -> dict:
    """The run directory once the paused run's record writer is done with it:
    status.json and TensorBoard follow the rounds within about a second
    (docs/run-records.md), so the same snapshot twice, `quiet` apart."""
    deadline = time.monotonic() + timeout
    last = snapshot(run_dir)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = snapshot(run_dir)
        if now == last:
            return now
        last = now
    raise AssertionError(f"{run_dir} kept changing for {timeout}s while its run was paused")


def test_second_coordinator_is_refused_and_the_first_finishes_intact(workers2, reference, tmp_path):
    run_dir = tmp_path / "run"
    pause = Pause(tmp_path, "round:3")
    first = _start_train(workers2, run_dir, pause)
    try:
        pause.wait(first)
        before = _settled(run_dir)
        for command, args in (
            ("train", ["--addresses", _addresses(workers2)]),
            ("run", ["--workers", "2"]),
        ):
            started = time.monotonic()
            result = fedcompose(command, *args, *TRAIN, "--run-dir", str(run_dir), timeout=120)
            assert_one_line_error(result, command, 5, "is in use by another fedcompose")
            assert "ready on" not in result.stderr  # `run` started no worker
            assert time.monotonic() - started < 60
        assert snapshot(run_dir) == before
        pause.release()
        _, stderr = communicate_or_explain(first, 300)
    finally:
        kill_tree(first)
    assert first.returncode == 0, stderr[-3000:]
    _finished_cleanly(run_dir)
    _same_model(reference, run_dir)


def test_a_sigkilled_holder_leaves_no_stuck_lock(workers2, reference, tmp_path):
    run_dir = tmp_path / "run"
    pause = Pause(tmp_path, "round:4")
    proc = _start_train(workers2, run_dir, pause)
    try:
        pause.wait(proc)
        wait_recorded(run_dir, 3, 3, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        kill_tree(proc)
    result = _train(workers2, run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stderr and "after round 3" in result.stderr
    _finished_cleanly(run_dir)
    _same_model(reference, run_dir)


# --- resuming on other data ------------------------------------------------------------


@pytest.fixture(scope="module")
def other_build(tmp_path_factory) -> list[Path]:
    """Shards of another build: 30 writers instead of 60."""
    return build.build_shards(DataConfig(writers=30), tmp_path_factory.mktemp("other"), 2)


def test_resume_on_other_data_is_refused_with_the_difference(
    workers2, other_build, reference, tmp_path
):
    run_dir = tmp_path / "run"
    result = _train(workers2, run_dir, "--rounds", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    before = snapshot(run_dir, skip=("logs", ".lock"))
    other = workers_lib.start_workers(other_build, tmp_path / "other-logs", check="quick")
    try:
        result = _train(other, run_dir)
    finally:
        workers_lib.stop_workers(other)
    assert_one_line_error(
        result, "train", 5, f"{run_dir} was trained on build", "clients 60 -> 30",
        "resume it on the shards it was trained on",
    )  # fmt: skip
    # Half the federation is other data too.
    result = _train(workers2[:1], run_dir)
    assert_one_line_error(result, "train", 5, "clients 60 -> 30", "clients per shard")
    assert snapshot(run_dir, skip=("logs", ".lock")) == before
    assert status(run_dir)["state"] == "finished"
    result = _train(workers2, run_dir)  # the right shards: resumes
    assert result.returncode == 0, result.stderr[-2000:]
    _finished_cleanly(run_dir)
    _same_model(reference, run_dir)


def test_run_refuses_changed_data_before_touching_shards_or_starting_workers(other_build, tmp_path):
    run_dir = tmp_path / "run"
    fedcompose(
        "run", "--workers", "2", "--writers", "40", "--rounds", "2", "--run-dir", str(run_dir),
        check=True,
    )  # fmt: skip
    before = snapshot(run_dir, skip=("logs", ".lock"))
    cases = [
        (["--writers", "30", "--workers", "2"], "data.writers: 40 -> 30"),
        (["--writers", "40", "--data-seed", "1", "--workers", "2"], "data.data_seed: 0 -> 1"),
        (["--writers", "40", "--workers", "3"], "--workers 3 would rebuild its shards"),
        (["--shards-dir", str(other_build[0].parent)], "clients 40 -> 30"),
    ]
    for argv, message in cases:
        result = fedcompose("run", *argv, "--rounds", "4", "--run-dir", str(run_dir))
        assert_one_line_error(result, "run", 5, message)
        assert "ready on" not in result.stderr and "building" not in result.stderr
        assert snapshot(run_dir, skip=("logs", ".lock")) == before, argv

    # `train` takes no data settings: it resumes the run on its own shards,
    # and the recorded data settings stay what they were.
    shards = sorted((run_dir / "shards").glob("shard-*"))
    workers = workers_lib.start_workers(shards, tmp_path / "logs", check="quick")
    try:
        result = _train(workers, run_dir, "--rounds", "3")
    finally:
        workers_lib.stop_workers(workers)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stderr and "after round 2" in result.stderr
    assert "writers = 40" in (run_dir / "config.toml").read_text()
    _finished_cleanly(run_dir, rounds=3)


# --- damaged checkpoints -------------------------------------------------------------


def test_truncated_latest_checkpoint_falls_back_to_the_newest_intact(workers2, reference, tmp_path):
    run_dir = tmp_path / "run"
    assert _train(workers2, run_dir, "--rounds", "4").returncode == 0
    assert checkpoints(run_dir) == [1, 2, 3, 4]  # the first and the 3 newest kept
    data = run_dir / "checkpoints" / "round_4" / "state.npz"
    os.truncate(data, data.stat().st_size // 3)
    result = _train(workers2, run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    warning = next(line for line in result.stderr.splitlines() if "cannot be read" in line)
    assert "round_4" in warning and "resuming from" in warning and "round_3" in warning
    assert "does not fit" not in result.stderr
    assert (run_dir / "checkpoints" / "unreadable-round_4").is_dir()
    _finished_cleanly(run_dir)
    _same_model(reference, run_dir)

    # Nothing intact at all: refused in one line, nothing changed.
    for version in checkpoints(run_dir):
        (run_dir / "checkpoints" / f"round_{version}" / "state.npz").write_bytes(b"\0" * 9)
    before = snapshot(run_dir, skip=("logs", ".lock"))
    result = _train(workers2, run_dir, "--rounds", str(ROUNDS + 1))
    assert_one_line_error(result, "train", 5, "no checkpoint in", "can be read")
    assert snapshot(run_dir, skip=("logs", ".lock")) == before


# --- full disks -------------------------------------------------------------------------


def test_full_disk_at_start_names_the_file_and_blames_no_worker(shards2, tmp_path):
    with tmpfs(tmp_path / "fs", "1m") as fs:
        fill(fs)
        started = time.monotonic()
        result = fedcompose(
            "run", "--shards-dir", str(shards2[0].parent), "--rounds", "2",
            "--run-dir", str(fs / "run"), timeout=300,
        )  # fmt: skip
        assert time.monotonic() - started < 120
        assert_one_line_error(
            result, "run", 5, "No space left on device", str(fs / "run" / "config.toml")
        )
        assert "did not" not in result.stderr  # no worker blamed
        assert "ready on" in result.stderr  # the workers started despite their logs
        assert temporaries(fs / "run") == []


def test_full_disk_mid_run_fails_cleanly_and_resumes(shards2, reference, tmp_path):
    with tmpfs(tmp_path / "fs", "8m") as fs:
        run_dir = fs / "run"
        pause = Pause(tmp_path, "round:4")
        proc = start_fedcompose(
            "run", "--shards-dir", str(shards2[0].parent), *TRAIN, "--run-dir", str(run_dir),
            env=pause.env,
        )  # fmt: skip
        try:
            pause.wait(proc)
            filler = fill(fs)
            pause.release()
            _, stderr = communicate_or_explain(proc, 300)
        finally:
            kill_tree(proc)
        result = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)
        assert_one_line_error(result, "run", 5, "No space left on device", str(run_dir))
        s = assert_consistent(run_dir, "failed")
        # Round 4's metrics are appended in place, which may fit in a block the
        # files already hold; its checkpoint needs new blocks, and fails.
        assert s["completed_rounds"] in (3, 4) and "No space left" in s["error"]
        assert s["checkpoint_round"] == 3
        filler.unlink()
        result = fedcompose(
            "run", "--shards-dir", str(shards2[0].parent), *TRAIN, "--run-dir", str(run_dir),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        _finished_cleanly(run_dir)
        _same_model(reference, run_dir)


def test_full_disk_while_building_shards(tmp_path):
    with tmpfs(tmp_path / "fs", "2m") as fs:
        result = fedcompose("run", "--rounds", "1", "--run-dir", str(fs / "run"))
        assert_one_line_error(result, "run", 5, "cannot write the run's shards", str(fs / "run"))
        result = fedcompose("data", "--shards-dir", str(fs / "shards"))
        assert_one_line_error(result, "data", 1, "cannot write the shards", str(fs / "shards"))
        # Partial shards are removed at once: the space is free again. The run
        # directory, which this run made and recorded nothing in, goes too.
        leftovers = [p for p in fs.rglob("*") if p.is_file()]
        assert leftovers == []


# --- signals at each phase of a run --------------------------------------------------

PHASES = [
    ("startup", False),  # locked, workers not yet contacted
    ("round:2", True),  # waiting on a worker mid-round
    ("record:3", False),  # the writer about to write round 3, the trainer running on
    ("evaluation:4", True),  # waiting on a worker mid-evaluation
    ("checkpoint:5", False),  # checkpoint written, not yet in place (by the writer too)
]


@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: signal.Signals(s).name
)
def test_signals_at_each_phase_leave_a_resumable_run(workers2, reference, tmp_path, sig):
    """One run directory is stopped by `sig` at every phase in turn, resumed
    each time, and ends with the uninterrupted run's model."""
    run_dir = tmp_path / "run"
    private_dirs: set[Path] = set()  # the coordinators' server executors' directories
    for point, mid_call in PHASES:
        pause = Pause(tmp_path, point)
        proc = _start_train(workers2, run_dir, pause)
        stopped = None
        try:
            pause.wait(proc)
            children = psutil.Process(proc.pid).children(recursive=True)
            private_dirs |= {Path(c.cwd()) for c in children if "worker_binary" in c.name()}
            if mid_call:  # let the coordinator block in a real call to a stalled worker
                stopped = _executor(workers2[1])
                stopped.suspend()
                pause.release()
                time.sleep(1.5)
            os.kill(proc.pid, sig)
            if stopped is not None:
                stopped.resume()
            _, stderr = communicate_or_explain(proc, 120)
        finally:
            if stopped is not None and stopped.is_running():
                stopped.resume()
            pause.release()
            kill_tree(proc)
        _, alive = psutil.wait_procs(children, timeout=20)
        assert not alive, f"{point}: {[c.cmdline() for c in alive]}"
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
            continue
        result = subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr)
        assert_one_line_error(result, "train", 130, "interrupted")
        if point != "startup":  # at start-up the run had not begun: nothing recorded
            assert_consistent(run_dir, "interrupted")
            assert temporaries(run_dir) == [], point
    assert len(private_dirs) == len(PHASES) - 1  # one per phase after start-up
    result = _train(workers2, run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    _finished_cleanly(run_dir)
    _same_model(reference, run_dir)
    # Removed by their owners, or (SIGKILL) swept by the next coordinator.
    assert not [d for d in private_dirs if d.exists()]


def test_a_sigkilled_workers_directory_is_swept_by_the_next_worker(shards2, tmp_path):
    first = workers_lib.start_workers(shards2[:1], tmp_path / "logs1", check="quick")
    try:
        runtime = Path(_executor(first[0]).cwd())
        assert runtime.name.startswith("fedcompose-worker-") and (runtime / "shard").is_symlink()
        os.kill(first[0].process.pid, signal.SIGKILL)  # the worker alone
        first[0].process.wait(timeout=30)
        assert runtime.is_dir()  # nothing could remove it
    finally:
        workers_lib.stop_workers(first)
    second = workers_lib.start_workers(shards2[1:], tmp_path / "logs2", check="quick")
    try:
        assert not runtime.exists()
    finally:
        workers_lib.stop_workers(second)


def test_pause_points_contract_matches_the_helpers():
    from shared import exit_guard, pause_points
    from tests import fault_tools

    assert (pause_points.ENV_POINT, pause_points.ENV_FILE) == (
        fault_tools.PAUSE_AT,
        fault_tools.PAUSE_FILE,
    )
    assert exit_guard.MARKER == fault_tools.EXIT_GUARD_MARKER
