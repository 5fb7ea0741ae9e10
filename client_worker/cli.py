"""`fedcompose worker`: serve one shard of clients to a coordinator."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

from shared import logs, processes
from shared.shard_format import ShardError

log = logging.getLogger("fedcompose.worker")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="fedcompose worker")
    parser.description = (
        "Serve one shard of clients behind TFF's C++ executor service over gRPC. "
        "The coordinator sends computations; the examples never leave this machine. "
        "WARNING: the executor service listens on all interfaces without TLS or "
        "authentication; expose the port only to the coordinator (firewall, private "
        "network or SSH tunnel)."
    )
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument(
        "--shard", type=Path, required=True, help="shard directory made by `fedcompose data`"
    )
    parser.add_argument("--port", type=int, default=10000, help="port to serve on (all interfaces)")
    parser.add_argument(
        "--log-file", type=Path, default=None, help="also write the worker's log here"
    )
    parser.add_argument(
        "--check",
        choices=("full", "quick"),
        default="full",
        help="full: read every example (checksums, pixel and label ranges); quick: sizes only",
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the service to come up",
    )
    parser.add_argument("--max-message-mb", type=int, default=2000, help="gRPC message size limit")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def run(args: argparse.Namespace) -> int:
    logs.setup(verbose=args.verbose, log_file=args.log_file, name=f"worker:{args.port}")
    # A worker started by a launcher must not outlive it.
    processes.die_with_parent(signal.SIGTERM)
    if not 0 < args.port < 65536:
        log.error("invalid --port %s: use 1-65535", args.port)
        return 2

    from client_worker import service, shard_check

    shard_dir = args.shard.expanduser()
    started = time.monotonic()
    try:
        manifest = shard_check.check_shard(shard_dir, deep=args.check == "full")
    except ShardError as e:
        log.error("bad shard: %s", e)
        return 1
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

    def on_signal(signum, _frame) -> None:
        stop_requested.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    executor_log = args.log_file.with_suffix(".executor.log") if args.log_file else None
    try:
        svc = service.start(
            shard_dir,
            manifest,
            args.port,
            executor_log=executor_log,
            ready_timeout=args.ready_timeout,
            max_message_mb=args.max_message_mb,
        )
    except service.WorkerStartError as e:
        log.error("cannot start: %s", e)
        return 1
    log.info(
        "ready: serving %d clients on port %d (pid %d)",
        len(manifest.clients),
        args.port,
        svc.process.pid,
    )
    try:
        while not stop_requested:
            code = svc.process.poll()
            if code is not None:
                log.error(
                    "TFF's executor service exited unexpectedly with code %s: %s",
                    code,
                    svc.executor_log_tail() or "no output",
                )
                return 1
            time.sleep(0.2)
        log.info("stopping on %s", signal.Signals(stop_requested[0]).name)
        return 0
    finally:
        svc.stop()
        log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
