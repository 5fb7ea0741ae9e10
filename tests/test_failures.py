"""Unreachable, dead and stuck workers give a clear error, never a hang."""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest

from shared.ports import free_ports
from tests.conftest import fedcompose, kill_tree, start_fedcompose


def _wait_for_rounds(run_dir, count: int, proc, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= count:
            return
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"no {count} rounds within {timeout}s")


def _endless_training(workers, run_dir, rpc_timeout: int):
    """Training that accepts no lost client and retries nothing (see
    test_worker_failures.py for runs that survive failures)."""
    addresses = ",".join(w.address for w in workers)
    return start_fedcompose(
        "train", "--addresses", addresses, "--rounds", "500", "--eval-every", "0",
        "--rpc-timeout", str(rpc_timeout), "--run-dir", str(run_dir),
        "--min-coverage", "1", "--round-retries", "0",
    )  # fmt: skip


def _executor_of(worker) -> psutil.Process:
    children = psutil.Process(worker.process.pid).children()
    return next(c for c in children if "worker_binary" in " ".join(c.cmdline()))


@pytest.mark.slow
def test_unreachable_worker_at_start(tmp_path):
    (port,) = free_ports(1)
    started = time.monotonic()
    result = fedcompose(
        "train",
        "--addresses",
        f"localhost:{port}",
        "--connect-timeout",
        "3",
        "--run-dir",
        str(tmp_path / "run"),
        timeout=120,
    )
    assert result.returncode == 4
    # Refused all along: said so, after retrying for the connect timeout (a
    # worker may still be starting when `train` starts).
    assert f"worker localhost:{port}: connection refused: nothing listens on port {port}" in (
        result.stderr
    )
    assert "(waited 3s)" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 90


@pytest.mark.slow
def test_worker_killed_during_a_round(workers2, tmp_path):
    run_dir = tmp_path / "run"
    proc = _endless_training(workers2, run_dir, rpc_timeout=30)
    try:
        _wait_for_rounds(run_dir, 2, proc)
        victim = workers2[1]
        os.killpg(victim.process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        assert time.monotonic() - killed_at < 30
    finally:
        kill_tree(proc)
    assert proc.returncode == 4
    assert f"worker {victim.address}" in stderr
    assert "connection lost" in stderr or "connection refused" in stderr
    assert "Traceback" not in stderr
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and status["completed_rounds"] >= 2


@pytest.mark.slow
def test_stuck_worker_hits_the_deadline(workers2, tmp_path):
    run_dir = tmp_path / "run"
    proc = _endless_training(workers2, run_dir, rpc_timeout=5)
    stuck = _executor_of(workers2[0])
    try:
        _wait_for_rounds(run_dir, 2, proc)
        stuck.suspend()
        stopped_at = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        waited = time.monotonic() - stopped_at
    finally:
        stuck.resume()
        kill_tree(proc)
    assert proc.returncode == 4
    assert f"worker {workers2[0].address}: no answer" in stderr
    assert "within the 5s deadline" in stderr
    assert waited < 30
