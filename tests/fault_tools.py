"""Helpers for the fault tests: small file systems, directory snapshots,
pause points, one-line error checks."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

# The contract of shared/pause_points.py, spelled out so these helpers load anywhere.
PAUSE_AT = "FEDCOMPOSE_PAUSE_AT"
PAUSE_FILE = "FEDCOMPOSE_PAUSE_FILE"
EXIT_GUARD_MARKER = "fedcompose: still exiting after"  # shared/exit_guard.py


def error_lines(stderr: str, command: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"fedcompose {command}: ")]


def assert_one_line_error(result, command: str, code: int, *needles: str) -> str:
    """The command failed with `code`, saying so in exactly one line that
    holds every needle, with no traceback or logging error anywhere."""
    stderr = result.stderr
    assert result.returncode == code, f"exit {result.returncode}, not {code}:\n{stderr[-3000:]}"
    lines = error_lines(stderr, command)
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "Logging error" not in stderr, stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple]:
    """Every entry under `root` with its kind, size and content digest."""
    found: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if any(rel == s or rel.startswith(s + "/") for s in skip):
            continue
        if path.is_symlink():
            found[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            found[rel] = ("dir",)
        else:
            try:
                found[rel] = (
                    "file",
                    path.stat().st_size,
                    hashlib.sha256(path.read_bytes()).hexdigest(),
                )
            except FileNotFoundError:
                # Renamed or removed between the listing and the read (a
                # writer's staging file): recorded as such, so a snapshot taken
                # while a writer works differs from the next, never crashes.
                found[rel] = ("vanished",)
    return found


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real small file system at `path` (needs root), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.fail("this test mounts a small tmpfs to fill it up, which needs root")
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(fs: Path) -> Path:
    """Fills the file system at `fs` to the last byte."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for size in (1 << 20, 65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    assert os.statvfs(fs).f_bavail == 0, "the file system is not full"
    return filler


class Pause:
    """Holds a fedcompose process at a named point (`shared.pause_points`)."""

    def __init__(self, tmp_path: Path, point: str):
        self.marker = tmp_path / f"pause-{point.replace(':', '-')}"
        self.env = {
            **os.environ,
            PAUSE_AT: point,
            PAUSE_FILE: str(self.marker),
        }

    def wait(self, proc: subprocess.Popen, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not self.marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"exited {proc.returncode}: {proc.stderr.read()[-3000:]}")
            assert time.monotonic() < deadline, "the pause point was never reached"
            time.sleep(0.05)

    def release(self) -> None:
        self.marker.unlink(missing_ok=True)


def communicate_or_explain(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """`proc.communicate(timeout)`; a process that does not end in time is
    asked for every thread's stack (`kill -USR1`, see `deploy/cli.py`), and
    the test fails showing them: where it hung, not only that it did."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(3)
        proc.kill()
        out, err = proc.communicate(timeout=30)
        stacks = err[-12000:]
        raise AssertionError(f"still running after {timeout} s; its stacks:\n{stacks}") from None
    if EXIT_GUARD_MARKER in err:  # it left, with its code, but late: say where it waited
        warnings.warn(f"exit held: {err[err.index(EXIT_GUARD_MARKER) :][:12000]}", stacklevel=2)
    return out, err


def status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def metric_rounds(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["round"] for line in path.read_text().splitlines() if line.strip()]


def csv_rounds(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.csv"
    if not path.exists():
        return []
    return [int(line.split(",")[0]) for line in path.read_text().splitlines()[1:] if line]


def checkpoints(run_dir: Path) -> list[int]:
    d = run_dir / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(int(p.name.split("_")[1]) for p in d.iterdir() if p.name.startswith("round_"))


def wait_recorded(
    run_dir: Path, rows: int, checkpoint: int | None, proc: subprocess.Popen, timeout: float = 120
) -> None:
    """Waits until `run_dir` holds the metrics of rounds 1..`rows` and the
    checkpoint of round `checkpoint`. The record writer lags the trainer (by
    up to two rounds, more on a loaded machine: a round of the linear model
    takes milliseconds), so a test that SIGKILLs a coordinator at a pause
    point must wait for what it will resume from, or it resumes from less."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done = len(metric_rounds(run_dir)) >= rows
        except ValueError:  # a row half written
            done = False
        if done and (checkpoint is None or checkpoint in checkpoints(run_dir)):
            return
        assert proc.poll() is None, f"exited {proc.returncode}"
        assert time.monotonic() < deadline, f"rounds 1-{rows}, checkpoint {checkpoint}: not there"
        time.sleep(0.05)


def temporaries(run_dir: Path) -> list[str]:
    """What a killed writer leaves: `.x.tmp-PID` and TFF's `x_tempNNNN`."""
    return sorted(
        str(p.relative_to(run_dir))
        for p in run_dir.rglob("*")
        if ".tmp-" in p.name or "_temp" in p.name
    )


def assert_consistent(run_dir: Path, state: str | None = None) -> dict:
    """status.json agrees with the metrics and checkpoints on disk."""
    s = status(run_dir)
    if state is not None:
        assert s.get("state") == state, s
    rounds = metric_rounds(run_dir)
    assert rounds == list(range(1, len(rounds) + 1)), rounds
    assert s.get("completed_rounds", 0) == len(rounds), (s, rounds)
    assert s.get("checkpoint_round", 0) == max(checkpoints(run_dir), default=0), (
        s,
        checkpoints(run_dir),
    )
    assert csv_rounds(run_dir)[: len(rounds)] == rounds
    return s
