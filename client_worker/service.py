"""Running TFF's executor service over one shard, and stopping it cleanly.

The executor service (`worker_binary`) resolves relative paths against its
working directory. The worker gives it a private working directory that holds
a link to the shard and a `worker.json` describing the worker, so that
computations sent by the coordinator can read the shard's clients and nothing
needs to be copied.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from shared import executor_binary, processes, scratch, shard_format, worker_dir
from shared.errors import FedcomposeError

log = logging.getLogger("fedcompose.worker")


class WorkerStartError(FedcomposeError):
    """The executor service could not be started on this shard and port."""


@dataclasses.dataclass
class WorkerService:
    shard_dir: Path
    port: int
    manifest: shard_format.Manifest
    runtime_dir: Path
    process: subprocess.Popen
    executor_log: Path

    def stop(self) -> None:
        processes.stop(self.process, grace=5.0, sig=signal.SIGTERM)
        scratch.release(self.runtime_dir)

    def executor_log_tail(self, lines: int = 5) -> str:
        try:
            text = self.executor_log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])


def check_port_free(port: int) -> None:
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                if e.errno in (98, 13):  # EADDRINUSE, EACCES
                    raise WorkerStartError(
                        f"port {port} is not available ({e.strerror}); choose another with --port"
                    ) from None
                raise
            return


def _wait_until_serving(port: int, process: subprocess.Popen, timeout: float) -> bool:
    import grpc

    channel = grpc.insecure_channel(f"localhost:{port}")
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            try:
                grpc.channel_ready_future(channel).result(timeout=0.25)
                return True
            except grpc.FutureTimeoutError:
                continue
        return False
    finally:
        channel.close()


def start(
    shard_dir: Path,
    manifest: shard_format.Manifest,
    port: int,
    *,
    executor_log: Path | None = None,
    ready_timeout: float = 60.0,
    max_message_mb: int = executor_binary.DEFAULT_MAX_MESSAGE_MB,
) -> WorkerService:
    check_port_free(port)
    runtime_dir = scratch.make("worker", str(port))
    info = worker_dir.WorkerInfo(
        tff_version=executor_binary.tff_version(),
        python=sys.version.split()[0],
        host=socket.gethostname(),
        pid=os.getpid(),
        port=port,
        shard=str(shard_dir.resolve()),
        started_at=time.time(),
    )
    worker_dir.lay_out(runtime_dir, shard_dir, info)
    executor_log = executor_log or runtime_dir / "executor.log"
    executor_log.parent.mkdir(parents=True, exist_ok=True)
    with open(executor_log, "ab") as log_file:
        process = executor_binary.start(port, runtime_dir, log_file, max_message_mb)
    service = WorkerService(shard_dir, port, manifest, runtime_dir, process, executor_log)
    if not _wait_until_serving(port, process, ready_timeout):
        code = process.poll()
        tail = service.executor_log_tail()
        service.stop()
        if code is None:
            raise WorkerStartError(
                f"TFF's executor service did not start serving on port {port} within "
                f"{ready_timeout:g}s"
            )
        raise WorkerStartError(
            f"TFF's executor service exited with code {code} at start"
            + (f": {tail}" if tail else "")
        )
    return service
