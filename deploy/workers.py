"""Starting client-worker processes on this machine and stopping them.

A worker is `fedcompose worker` in a child process. The launcher reads the
child's terminal output through a pipe (a thread drains it, keeping the last
lines): the worker's ready line (`shared.worker_dir.READY_MARK`) says it
serves, and its last line says why it stopped. The worker's log file is for
people; readiness never depends on it being writable.

While a run goes on, a `Supervisor` restarts a worker that exits (crashed, or
its executor service was killed), on the same port and shard, a bounded
number of times with back-off; the coordinator takes it back when its probe
finds it serving its shard again.
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
        self.since_ready: collections.deque[str] = collections.deque(maxlen=keep)
        """Lines after the ready line: only these can say why a serving worker exited."""
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._drain, args=(stream,), daemon=True)
        self._thread.start()

    def _drain(self, stream) -> None:
        with contextlib.suppress(OSError, ValueError):
            for raw in stream:
                line = raw.decode(errors="replace").rstrip()
                self.lines.append(line)
                if self.ready.is_set():
                    self.since_ready.append(line)
                elif worker_dir.READY_MARK in line:
                    self.ready.set()

    def last_error(self) -> str:
        for line in reversed(self.lines):
            if "error:" in line or " ERROR " in line:
                return line.split("error:", 1)[-1].split(" ERROR ", 1)[-1].strip()
        return self.lines[-1] if self.lines else "no output"

    def exit_reason(self, returncode: int | None) -> str:
        """Why the process exited with `returncode`: its signal, and the error it
        wrote after it served (before: at start), never an older line."""
        what = f"exited with code {returncode}"
        if returncode is not None and returncode < 0:
            with contextlib.suppress(ValueError):
                what += f" (killed by {signal.Signals(-returncode).name})"
        lines = self.since_ready if self.ready.is_set() else self.lines
        for line in reversed(lines):
            if "error:" in line or " ERROR " in line:
                return f"{what}: {line.split('error:', 1)[-1].split(' ERROR ', 1)[-1].strip()}"
        return what

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
    args: list[str] = dataclasses.field(default_factory=list)
    """The command line it was started with (a restart uses it again)."""
    restarts: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def last_error(self) -> str:
        return self.output.last_error()


def _spawn(args: list[str]) -> tuple[subprocess.Popen, _OutputTail]:
    # The worker asks the kernel for SIGTERM on our death itself (so it can stop
    # its executor in order): a restart happens while the coordinator's gRPC
    # threads run, where forking with Python code before exec is not safe.
    process = processes.spawn(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        death_signal=None,
    )
    assert process.stdout is not None
    return process, _OutputTail(process.stdout)


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

    def spawn(i: int, port: int) -> LocalWorker:
        log_file = logs_dir / f"worker-{i}.log"
        args = worker_command(
            shard_dirs[i],
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
        process, output = _spawn(args)
        return LocalWorker(i, shard_dirs[i], port, log_file, process, output, args)

    workers: list[LocalWorker] = []
    try:
        for i, port in enumerate(chosen):
            workers.append(spawn(i, port))
        for attempt in range(1, PORT_ATTEMPTS + 1):
            try:
                # The worker itself gives up after its ready timeout; a little more here.
                _wait_ready(workers, ready_timeout + 15.0)
                break
            except _PortTaken as taken:
                # A port picked free was taken before the worker bound it (by
                # another program, or an outgoing connection's local port).
                if base_port or attempt == PORT_ATTEMPTS:
                    raise taken.error from None
                w = taken.worker
                log.info("worker %d: port %d was taken meanwhile; trying another", w.index, w.port)
                workers[w.index] = spawn(w.index, ports.free_port())
    except BaseException:
        stop_workers(workers)
        raise
    return workers


PORT_ATTEMPTS = 3
"""Starts of a worker whose free port was taken before it could bind it."""


class _PortTaken(Exception):
    def __init__(self, worker: LocalWorker, error: LaunchError):
        self.worker = worker
        self.error = error


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
                reason = w.last_error()
                error = LaunchError(
                    f"worker {w.index} ({w.shard}) exited at start: {reason} (log: {w.log_file})"
                )
                if f"port {w.port} is" in reason and ("in use" in reason or "available" in reason):
                    raise _PortTaken(w, error)
                raise error
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


def restart_worker(worker: LocalWorker) -> None:
    """Starts `worker` again with its own command line (same shard, port and log
    file); `wait_serving` tells when it serves."""
    worker.output.join(timeout=0.5)
    worker.process, worker.output = _spawn(worker.args)
    worker.restarts += 1


def wait_serving(worker: LocalWorker, timeout: float, stop: threading.Event | None = None) -> bool:
    """Whether `worker` says it serves within `timeout` s (False: it exited,
    did not say so in time, or `stop` was set)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.output.ready.is_set():
            return True
        if worker.process.poll() is not None or (stop is not None and stop.is_set()):
            return False
        time.sleep(0.05)
    return worker.output.ready.is_set()


class Supervisor:
    """Restarts local workers that exit while a run goes on.

    Each worker is restarted at most `max_restarts` times, the k-th time after
    `backoff * 2**(k-1)` seconds (at most `MAX_BACKOFF`); every exit and restart
    is logged. Each worker has a supervising thread of its own, so that one
    worker's back-off or slow start never delays another's restart (with one
    thread for all, a federation that lost every worker got them back one
    after another, and a restart that never became ready held the others for
    its whole ready timeout). Restarted processes are children of their
    supervising thread, whose death the kernel reports to them
    (`PR_SET_PDEATHSIG`): the threads therefore live until `stop`, and never
    die of an error.
    """

    MAX_BACKOFF = 30.0

    def __init__(
        self,
        workers: Sequence[LocalWorker],
        *,
        max_restarts: int,
        backoff: float,
        ready_timeout: float,
    ):
        self.workers = list(workers)
        self.max_restarts = max_restarts
        self.backoff = backoff
        self.ready_timeout = ready_timeout
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(
                target=self._watch, args=(w,), name=f"supervisor-{w.index}", daemon=True
            )
            for w in self.workers
        ]

    def start(self) -> Supervisor:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """No restart from now on; a restart under way is abandoned (the caller
        stops the workers)."""
        self._stop.set()
        deadline = time.monotonic() + 5.0
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _watch(self, worker: LocalWorker) -> None:
        while not self._stop.wait(0.2):
            if worker.process.poll() is None:
                continue
            try:
                if not self._restart(worker):
                    return  # given up on it
            except Exception:  # the supervisor must outlive any one restart
                log.exception("restarting worker %d failed", worker.index)

    def _restart(self, worker: LocalWorker) -> bool:
        """Restarts the worker after its back-off; False once its restarts are used up."""
        worker.output.join(timeout=0.5)
        why = worker.output.exit_reason(worker.process.returncode)
        if worker.restarts >= self.max_restarts:
            log.error(
                "worker %d (%s) %s; it was restarted %d times already (--worker-restarts); "
                "not restarting it, the run goes on without it (log: %s)",
                worker.index, worker.address, why, worker.restarts, worker.log_file,
            )  # fmt: skip
            return False
        wait = min(self.MAX_BACKOFF, self.backoff * 2.0**worker.restarts)
        log.warning(
            "worker %d (%s) %s; restarting it in %.1fs (restart %d of %d)",
            worker.index, worker.address, why, wait, worker.restarts + 1, self.max_restarts,
        )  # fmt: skip
        if self._stop.wait(wait):
            return True
        started = time.monotonic()
        restart_worker(worker)
        if wait_serving(worker, self.ready_timeout + 15.0, self._stop):
            log.info(
                "worker %d serves again on %s (restart %d, %.1fs)",
                worker.index, worker.address, worker.restarts, time.monotonic() - started,
            )  # fmt: skip
        elif not self._stop.is_set():
            log.warning(
                "worker %d did not come back after restart %d: %s",
                worker.index, worker.restarts, worker.last_error(),
            )  # fmt: skip
        return True
