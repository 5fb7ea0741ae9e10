"""Starting client-worker processes on this machine and stopping them.

A worker is `fedcompose worker` in a child process. The launcher reads the
child's terminal output through a pipe (a thread drains it, keeping the last
lines): the worker's ready line (`shared.worker_dir.READY_MARK`) says it
serves, and its last line says why it stopped. The worker's log file is for
people; readiness never depends on it being writable.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from shared import ports, processes, worker_dir
from shared.errors import FederationError

log = logging.getLogger("fedcompose.launcher")


class LaunchError(FederationError):
    """A local worker did not start."""


class _OutputTail:
    """Drains a child's output, keeping its last lines and noticing its ready line."""

    def __init__(self, stream, keep: int = 40):
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._drain, args=(stream,), daemon=True)
        self._thread.start()

    def _drain(self, stream) -> None:
        with contextlib.suppress(OSError, ValueError):
            for raw in stream:
                line = raw.decode(errors="replace").rstrip()
                self.lines.append(line)
                if worker_dir.READY_MARK in line:
                    self.ready.set()

    def last_error(self) -> str:
        for line in reversed(self.lines):
            if "error:" in line or " ERROR " in line:
                return line.split("error:", 1)[-1].split(" ERROR ", 1)[-1].strip()
        return self.lines[-1] if self.lines else "no output"

    def join(self, timeout: float = 2.0) -> None:
        self._thread.join(timeout)


@dataclasses.dataclass
class LocalWorker:
    index: int
    shard: Path
    port: int
    log_file: Path
    process: subprocess.Popen
    output: _OutputTail

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def last_error(self) -> str:
        return self.output.last_error()


def worker_command(
    shard: Path,
    port: int,
    log_file: Path,
    *,
    check: str = "full",
    ready_timeout: float = 120.0,
    max_message_mb: int = 2000,
    verbose: bool = False,
) -> list[str]:
    """The command line of `fedcompose worker` for these settings."""
    args = [
        sys.executable,
        "-m",
        "deploy.cli",
        "worker",
        "--shard",
        str(shard),
        "--port",
        str(port),
        "--log-file",
        str(log_file),
        "--shard-check",
        check,
        "--ready-timeout",
        str(ready_timeout),
        "--max-message-mb",
        str(max_message_mb),
    ]
    return [*args, "--verbose"] if verbose else args


def start_workers(
    shard_dirs: Sequence[Path],
    logs_dir: Path,
    base_port: int = 0,
    check: str = "full",
    ready_timeout: float = 120.0,
    max_message_mb: int = 2000,
    verbose: bool = False,
    prefix: Callable[[int], list[str]] | None = None,
    extra_args: Callable[[int], list[str]] | None = None,
) -> list[LocalWorker]:
    """Starts one worker per shard and waits until every one serves, or fails.

    `prefix(i)` is put before worker i's command, e.g. `ip netns exec HOST`
    to run it on another (simulated) network host; `extra_args(i)` after it,
    e.g. `--tls-dir KIT` to serve mutual TLS.
    """
    count = len(shard_dirs)
    chosen = [base_port + i for i in range(count)] if base_port else ports.free_ports(count)
    logs_dir.mkdir(parents=True, exist_ok=True)
    workers: list[LocalWorker] = []
    try:
        for i, (shard, port) in enumerate(zip(shard_dirs, chosen, strict=True)):
            log_file = logs_dir / f"worker-{i}.log"
            args = worker_command(
                shard,
                port,
                log_file,
                check=check,
                ready_timeout=ready_timeout,
                max_message_mb=max_message_mb,
                verbose=verbose,
            )
            if extra_args is not None:
                args = [*args, *extra_args(i)]
            if prefix is not None:
                args = [*prefix(i), *args]
            # SIGTERM on our death lets the worker stop its executor in order.
            process = processes.spawn(
                args,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                death_signal=signal.SIGTERM,
            )
            assert process.stdout is not None
            workers.append(
                LocalWorker(i, shard, port, log_file, process, _OutputTail(process.stdout))
            )
        # The worker itself gives up after its ready timeout; a little more here.
        _wait_ready(workers, ready_timeout + 15.0)
    except BaseException:
        stop_workers(workers)
        raise
    return workers


def _wait_ready(workers: list[LocalWorker], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(workers)
    while pending:
        for w in list(pending):
            if w.output.ready.is_set():
                pending.remove(w)
                log.info("worker %d ready on %s (%s)", w.index, w.address, w.shard.name)
            elif w.process.poll() is not None:
                w.output.join()
                raise LaunchError(
                    f"worker {w.index} ({w.shard}) exited at start: {w.last_error()} "
                    f"(log: {w.log_file})"
                )
        if pending and time.monotonic() > deadline:
            w = pending[0]
            raise LaunchError(
                f"worker {w.index} did not say it serves within {timeout:g}s; its last output: "
                f"{w.output.lines[-1] if w.output.lines else 'none'} (log: {w.log_file})"
            )
        time.sleep(0.05)


def stop_workers(workers: Sequence[LocalWorker]) -> None:
    for w in workers:
        if w.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                w.process.send_signal(signal.SIGTERM)
    for w in workers:
        processes.stop(w.process, grace=10.0)
        w.output.join()
