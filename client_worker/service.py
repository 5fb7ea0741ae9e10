"""Running TFF's executor service over one shard, and stopping it cleanly.

The executor service (`worker_binary`) resolves relative paths against its
working directory. The worker gives it a private working directory that holds
a link to the shard and a `worker.json` describing the worker, so that
computations sent by the coordinator can read the shard's clients and nothing
needs to be copied.

The executor service listens on loopback only and owns its port
(`shared.loopback`). By default that is the worker's port: only this machine
(and SSH tunnels into it) can reach it. With a TLS kit, or with the explicit
plaintext opt-in, the executor gets a private loopback port and the worker's
port is served by `client_worker.proxy`.
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

from client_worker import proxy as proxy_lib
from client_worker.audit import AuditLog
from shared import executor_binary, loopback, ports, processes, scratch, shard_format, worker_dir
from shared.errors import FedcomposeError
from shared.tls import Kit

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
    executor_port: int = 0
    proxy: proxy_lib.Proxy | None = None
    log_offset: int = 0
    """Bytes of the executor log written before this process was serving: the
    log is appended to across restarts, so what precedes this offset (earlier
    processes' lines, this one's start-up) is never the reason it exits later."""
    audit: AuditLog = dataclasses.field(default_factory=lambda: AuditLog(None))

    @property
    def exposure(self) -> str:
        """Who can reach the worker's port, for its log."""
        if self.proxy is None:
            return "loopback only"
        if self.proxy.forwarder._allowed is not None:
            return (
                f"every interface, mutual TLS, only {self.proxy.forwarder._allowed!r} may call; "
                f"audit log {self.audit.path}"
            )
        return "EVERY INTERFACE, PLAINTEXT, NO AUTHENTICATION"

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        processes.stop(self.process, grace=5.0, sig=signal.SIGTERM)
        scratch.release(self.runtime_dir)
        self.audit.close()

    def executor_log_tail(self, lines: int = 5, since: int = 0) -> str:
        """The last `lines` lines of the executor log after byte `since`."""
        try:
            with open(self.executor_log, "rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def mark_serving(self) -> None:
        """From now on, only lines the executor writes count as its exit's reason."""
        try:
            self.log_offset = self.executor_log.stat().st_size
        except OSError:
            self.log_offset = 0

    def exit_reason(self, code: int) -> str:
        """Why the executor exited with `code` after serving: its signal, and the
        lines it wrote since it served (none: nothing is quoted)."""
        what = f"code {code}"
        if code < 0:
            with contextlib.suppress(ValueError):
                what += f" (killed by {signal.Signals(-code).name})"
        tail = self.executor_log_tail(since=self.log_offset)
        return f"{what}: {tail}" if tail else f"{what}; it wrote nothing since it started serving"


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


def _listens_on(pid: int, port: int) -> bool:
    try:
        return any(p == port for _, p in loopback.listening_addresses(pid))
    except OSError:
        return False


def _wait_until_serving(port: int, process: subprocess.Popen, timeout: float) -> bool:
    """Until *our* executor serves `port`: another process answering there (one
    that won a race for the port) does not count."""
    import grpc

    channel = grpc.insecure_channel(executor_binary.loopback_address(port))
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            try:
                grpc.channel_ready_future(channel).result(timeout=0.25)
            except grpc.FutureTimeoutError:
                continue
            if _listens_on(process.pid, port):
                return True
            time.sleep(0.1)
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
    kit: Kit | None = None,
    plaintext_network: bool = False,
    audit: AuditLog | None = None,
    handshake_timeout: float = proxy_lib.gate_lib.HANDSHAKE_TIMEOUT,
    max_pending: int = proxy_lib.gate_lib.MAX_PENDING,
) -> WorkerService:
    """Starts the executor over `shard_dir`; `port` is served on loopback, or
    through the proxy on every interface with `kit` (mutual TLS) or
    `plaintext_network`."""
    check_port_free(port)
    public = kit is not None or plaintext_network
    executor_port = ports.free_port() if public else port
    runtime_dir = scratch.make("worker", str(port))
    info = worker_dir.WorkerInfo(
        tff_version=executor_binary.tff_version(),
        python=sys.version.split()[0],
        host=socket.gethostname(),
        pid=os.getpid(),
        port=port,
        shard=str(shard_dir.resolve()),
        started_at=time.time(),
        tls=kit is not None,
    )
    worker_dir.lay_out(runtime_dir, shard_dir, info)
    executor_log = executor_log or runtime_dir / "executor.log"
    executor_log.parent.mkdir(parents=True, exist_ok=True)
    with open(executor_log, "ab") as log_file:
        # Appended to across restarts: earlier processes' lines are not this one's.
        log_start = log_file.tell()
        try:
            process = executor_binary.start(executor_port, runtime_dir, log_file, max_message_mb)
        except BaseException:
            scratch.release(runtime_dir)
            raise
    service = WorkerService(
        shard_dir,
        port,
        manifest,
        runtime_dir,
        process,
        executor_log,
        executor_port,
        None,
        log_start,
    )
    if audit is not None:
        service.audit = audit
    if not _wait_until_serving(executor_port, process, ready_timeout):
        code = process.poll()
        tail = service.executor_log_tail(since=log_start)
        service.stop()
        if "Address already in use" in tail or (code is None and not _port_free(executor_port)):
            raise WorkerStartError(
                f"port {executor_port} is already in use by another process (another worker "
                "started on it at the same moment?); choose another with --port"
            )
        if code is None:
            raise WorkerStartError(
                f"TFF's executor service did not start serving on port {port} within "
                f"{ready_timeout:g}s"
            )
        raise WorkerStartError(
            f"TFF's executor service exited with code {code} at start"
            + (f": {tail}" if tail else "")
        )
    service.mark_serving()
    try:
        loopback.check_confined(process.pid, f"TFF's executor service (pid {process.pid})")
        if public:
            service.proxy = proxy_lib.start(
                port,
                executor_binary.loopback_address(executor_port),
                kit,
                audit=service.audit,
                handshake_timeout=handshake_timeout,
                max_pending=max_pending,
            )
    except BaseException:
        service.stop()
        raise
    return service


def _port_free(port: int) -> bool:
    try:
        check_port_free(port)
    except WorkerStartError:
        return False
    return True
