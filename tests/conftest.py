"""Shared fixtures: real shards, real worker processes, and a guard that no
process started by a test outlives it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Every process a test starts inherits this marker, so the guard below finds
# exactly ours (workers, their executors, TFF's own executors), nobody else's.
TEST_TAG = f"fedcompose-test-{uuid.uuid4().hex[:12]}"
os.environ["FEDCOMPOSE_TEST_TAG"] = TEST_TAG
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Compiled computations are cached across the session's processes (see
# coordinator/rounds/prepared.py), in a cache of its own that starts empty: the
# first run of each algorithm builds it, the later ones load it, and nothing
# outside the session is read or left behind.
CACHE_DIR = tempfile.mkdtemp(prefix="fedcompose-test-cache-")
os.environ["FEDCOMPOSE_CACHE_DIR"] = CACHE_DIR

# Every executor service a test starts, TFF's own local ones included, listens
# on loopback only (issue 9): the shim is preloaded into every child (it acts
# only in `worker_binary`). Without the shim the session stops here, saying why.
from shared import loopback  # noqa: E402

loopback.confine_children()


def tagged_processes() -> list[psutil.Process]:
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == me:
            continue
        try:
            if (
                proc.environ().get("FEDCOMPOSE_TEST_TAG") == TEST_TAG
                and proc.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid}: {' '.join(proc.cmdline())[:160]}"
    except psutil.Error:
        return f"pid {proc.pid}"


@pytest.fixture(autouse=True)
def no_orphaned_processes() -> Iterator[None]:
    """Fails a test that leaves any worker, executor or coordinator behind."""
    yield
    deadline = time.monotonic() + 15
    leftovers = tagged_processes()
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.2)
        leftovers = tagged_processes()
    for proc in leftovers:  # clean up so one failure does not cascade
        try:
            proc.kill()
        except psutil.Error:
            pass
    assert not leftovers, "processes outlived the test:\n" + "\n".join(map(describe, leftovers))


def fedcompose(
    *args: str, timeout: float = 600, check: bool = False, **kwargs
) -> subprocess.CompletedProcess:
    """Runs the real `fedcompose` command line in a subprocess."""
    result = subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args],
        cwd=kwargs.pop("cwd", ROOT),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"fedcompose {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}"
        )
    return result


# `python -m deploy.cli` with SIGHUP at its default, as a shell in a terminal
# starts it: a suite run under `nohup` would otherwise hand its ignoring on.
AS_FROM_A_TERMINAL = (
    "import runpy, signal, sys; signal.signal(signal.SIGHUP, signal.SIG_DFL); "
    "sys.argv[0] = 'deploy.cli'; runpy.run_module('deploy.cli', run_name='__main__')"
)


def start_fedcompose(*args: str, terminal: bool = False, **kwargs) -> subprocess.Popen:
    """`fedcompose ARGS` in a session of its own; `terminal`: with SIGHUP at
    its default whatever this process does with it."""
    command = ["-c", AS_FROM_A_TERMINAL] if terminal else ["-m", "deploy.cli"]
    return subprocess.Popen(
        [sys.executable, *command, *args],
        cwd=kwargs.pop("cwd", ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kwargs,
    )


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def default_source():
    from deploy.data import default_data

    return default_data.load()


def build_default_shards(root: Path, num_shards: int) -> list[Path]:
    from deploy.data import build
    from shared.config import DataConfig

    return build.build_shards(DataConfig(), root, num_shards)


@pytest.fixture(scope="session")
def shards3(tmp_path_factory) -> list[Path]:
    return build_default_shards(tmp_path_factory.mktemp("shards3"), 3)


@pytest.fixture(scope="session")
def shards2(tmp_path_factory) -> list[Path]:
    return build_default_shards(tmp_path_factory.mktemp("shards2"), 2)


def _serving(shard_dirs: list[Path], tmp_path: Path) -> Iterator[list]:
    from deploy import workers as workers_lib

    started = workers_lib.start_workers(shard_dirs, tmp_path / "worker-logs", check="quick")
    try:
        yield started
    finally:
        workers_lib.stop_workers(started)


@pytest.fixture
def workers3(shards3, tmp_path):
    yield from _serving(shards3, tmp_path)


@pytest.fixture
def workers2(shards2, tmp_path):
    yield from _serving(shards2, tmp_path)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(CACHE_DIR, ignore_errors=True)
    # TFF's import-time default context owns a service manager whose __del__
    # fails noisily at interpreter exit; drop it while modules are alive.
    if "tensorflow_federated" in sys.modules:
        from tensorflow_federated.python.core.impl.context_stack import set_default_context

        set_default_context.set_no_default_context()
