"""`fedcompose worker`: serve one shard of clients to a coordinator."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from types import FrameType

from shared import config, logs, processes, worker_dir
from shared.errors import UsageError
from shared.shard_format import ShardError

log = logging.getLogger("fedcompose.worker")


DESCRIPTION = (
    "Serve one shard of clients behind TFF's C++ executor service over gRPC. "
    "The coordinator sends computations; the examples never leave this machine. "
    "By default --port listens on loopback only (this machine, or an SSH tunnel into "
    "it). With --tls-dir (a kit from `fedcompose provision`) it serves every interface "
    "with mutual TLS, and only the coordinator's certificate may call. "
    "--insecure-plaintext-network serves every interface without TLS or authentication."
)


def run(settings: config.RunConfig) -> int:
    w = settings.worker
    log_file = Path(w.log_file).expanduser() if w.log_file else None
    logs.setup(verbose=settings.output.verbose, log_file=log_file, name=f"worker:{w.port}")
    # A worker that `fedcompose run` supervises must not outlive it; one a user
    # started outlives the shell that started it.
    processes.die_with_parent(signal.SIGTERM)

    from client_worker import audit as audit_lib
    from client_worker import service, shard_check
    from shared import loopback, tls

    # Everything a user can get wrong about TLS and confinement fails here, in
    # one line, before the shard is read or anything starts.
    kit = tls.load_kit(settings.tls.tls_dir, tls.WORKER) if settings.tls.tls_dir else None
    loopback.confine_children()
    _raise_descriptor_limit()
    audit = None
    if kit is not None or settings.tls.insecure_plaintext_network:
        audit_path = (
            Path(settings.tls.audit_log).expanduser()
            if settings.tls.audit_log
            else audit_lib.default_path(log_file, w.port)
        )
        try:
            audit = audit_lib.AuditLog(audit_path)
        except OSError as e:
            raise UsageError(
                f"--audit-log {audit_path}: cannot be written ({e.strerror or e}); give a "
                "writable file with --audit-log"
            ) from None

    shard_dir = Path(w.shard).expanduser()
    started = time.monotonic()
    try:
        manifest = shard_check.check_shard(shard_dir, deep=w.shard_check == "full")
    except ShardError as e:
        log.error("bad shard: %s", e)
        raise
    log.info(
        "shard %s ok: %s, shard %d of %d, %d clients, %d train / %d test examples (%.1fs)",
        shard_dir,
        manifest.task.describe(),
        manifest.shard_index + 1,
        manifest.num_shards,
        len(manifest.clients),
        manifest.train_examples,
        manifest.test_examples,
        time.monotonic() - started,
    )

    stop_requested: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop_requested.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        # `nohup` ignores SIGHUP so that the worker outlives the terminal: keep it so.
        if sig == signal.SIGHUP and signal.getsignal(sig) is signal.SIG_IGN:
            continue
        signal.signal(sig, on_signal)

    executor_log = log_file.with_suffix(".executor.log") if log_file else None
    try:
        svc = service.start(
            shard_dir,
            manifest,
            w.port,
            executor_log=executor_log,
            ready_timeout=w.ready_timeout,
            max_message_mb=w.max_message_mb,
            kit=kit,
            plaintext_network=settings.tls.insecure_plaintext_network,
            audit=audit,
            handshake_timeout=settings.tls.handshake_timeout,
            max_pending=settings.tls.max_pending_handshakes,
        )
    except service.WorkerStartError as e:
        log.error("cannot start: %s", e)
        raise
    if settings.tls.insecure_plaintext_network:
        log.warning(
            "port %d is open to EVERY host that can reach this machine, WITHOUT TLS OR "
            "AUTHENTICATION: anyone there can run TensorFlow graphs (read and write files) "
            "as this user; use --tls-dir with a kit from `fedcompose provision` instead",
            w.port,
        )
    log.info(
        "%s %d clients on port %d (pid %d; %s)",
        worker_dir.READY_MARK,
        len(manifest.clients),
        w.port,
        svc.process.pid,
        svc.exposure,
    )
    try:
        while not stop_requested:
            code = svc.process.poll()
            if code is not None:
                raise service.WorkerStartError(
                    f"TFF's executor service exited unexpectedly with {svc.exit_reason(code)}"
                )
            time.sleep(0.2)
        log.info("stopping on %s", signal.Signals(stop_requested[0]).name)
        return 0
    finally:
        svc.stop()
        log.info("stopped")


def _raise_descriptor_limit() -> None:
    """The soft descriptor limit up to the hard one: each connection costs
    descriptors (up to three while relayed), and a low soft limit (often 1024,
    256 seen) is what a flood exhausts first."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
