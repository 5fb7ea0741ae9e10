"""Starting client-worker processes on this machine and stopping them."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from shared import processes

log = logging.getLogger("fedcompose.launcher")

READY_MARK = "ready: serving"


class LaunchError(RuntimeError):
    pass


@dataclasses.dataclass
class LocalWorker:
    index: int
    shard: Path
    port: int
    log_file: Path
    process: subprocess.Popen

    @property
    def address(self) -> str:
        return f"localhost:{self.port}"

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def last_error(self) -> str:
        lines = [ln for ln in self.log_text().splitlines() if " ERROR " in ln]
        if not lines:
            return "no error logged"
        return lines[-1].split(" ERROR ", 1)[1]


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def start_workers(
    shard_dirs: Sequence[Path],
    logs_dir: Path,
    base_port: int = 0,
    check: str = "full",
    ready_timeout: float = 120.0,
    verbose: bool = False,
    prefix: Callable[[int], list[str]] | None = None,
) -> list[LocalWorker]:
    """Starts one worker per shard and waits until every one serves, or fails.

    `prefix(i)` is put before worker i's command, e.g. `ip netns exec HOST`
    to run it on another (simulated) network host.
    """
    ports = (
        [base_port + i for i in range(len(shard_dirs))]
        if base_port
        else free_ports(len(shard_dirs))
    )
    logs_dir.mkdir(parents=True, exist_ok=True)
    workers: list[LocalWorker] = []
    try:
        for i, (shard, port) in enumerate(zip(shard_dirs, ports, strict=True)):
            log_file = logs_dir / f"worker-{i}.log"
            log_file.write_text("")
            args = [
                sys.executable,
                "-m",
                "client_worker",
                "--shard",
                str(shard),
                "--port",
                str(port),
                "--log-file",
                str(log_file),
                "--check",
                check,
            ]
            if verbose:
                args.append("--verbose")
            if prefix is not None:
                args = [*prefix(i), *args]
            # SIGTERM on our death lets the worker stop its executor in order.
            process = processes.spawn(
                args,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                death_signal=signal.SIGTERM,
            )
            workers.append(LocalWorker(i, shard, port, log_file, process))
        _wait_ready(workers, ready_timeout)
    except BaseException:
        stop_workers(workers)
        raise
    return workers


def _wait_ready(workers: list[LocalWorker], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(workers)
    while pending:
        for w in list(pending):
            if READY_MARK in w.log_text():
                pending.remove(w)
                log.info("worker %d ready on %s (%s)", w.index, w.address, w.shard.name)
            elif w.process.poll() is not None:
                raise LaunchError(
                    f"worker {w.index} ({w.shard}) exited at start: {w.last_error()} "
                    f"(log: {w.log_file})"
                )
        if pending and time.monotonic() > deadline:
            raise LaunchError(
                f"worker {pending[0].index} did not become ready within {timeout:g}s "
                f"(log: {pending[0].log_file})"
            )
        time.sleep(0.1)


def stop_workers(workers: Sequence[LocalWorker]) -> None:
    for w in workers:
        if w.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                w.process.send_signal(signal.SIGTERM)
    for w in workers:
        processes.stop(w.process, grace=10.0)
