"""`fedcompose run`: the whole federation on this machine, from one command.

Builds (or reuses) worker shards, starts one client-worker process per shard,
runs the coordinator against their addresses, restarts a worker that crashes
meanwhile (bounded, with back-off: `workers.Supervisor`), and stops every
process at the end, on Ctrl-C, on SIGTERM and on errors.
"""

from __future__ import annotations

import logging
from pathlib import Path

from shared import config as config_lib
from shared.errors import UsageError

log = logging.getLogger("fedcompose.launcher")


DESCRIPTION = (
    "Run a federation on this machine: build worker shards from the data (the offline "
    "sklearn-digits default unless told otherwise), start --workers client-worker "
    "processes, train with the coordinator, and stop everything at the end. "
    "Re-running with the same --run-dir resumes after the last checkpoint."
)


def _shard_dirs(config: config_lib.RunConfig, run_dir: Path, workers_given: bool) -> list[Path]:
    from deploy.data import build, progress, shards

    if config.data.shards_dir:
        found = shards.existing_shards(Path(config.data.shards_dir))
        if not found:
            raise UsageError(
                f"--shards-dir {config.data.shards_dir} holds no shard-NNN directories; "
                "build them with `fedcompose data`"
            )
        if workers_given and len(found) != config.federation.workers:
            raise UsageError(
                f"--workers {config.federation.workers} but --shards-dir "
                f"{config.data.shards_dir} holds {len(found)} shards (one per worker); "
                "leave out --workers"
            )
        # One worker per shard, and the recorded config says so.
        config.federation.workers = len(found)
        return found
    log.info(
        "building %d worker shards from the %s data", config.federation.workers, config.data.source
    )
    return build.build_shards(
        config.data,
        run_dir / "shards",
        config.federation.workers,
        progress=progress.bar,
    )


def run(config: config_lib.RunConfig) -> int:

    from coordinator.cli import prepare_run_dir, run_training
    from deploy import workers as workers_lib
    from shared import interrupts, logs, loopback

    # Every executor this starts is confined to loopback; without the shim, nothing starts.
    loopback.confine_children()
    run_dir = prepare_run_dir(config)
    logs.setup(
        verbose=config.output.verbose, log_file=run_dir / "logs" / "launcher.log", name="run"
    )
    interrupts.install()
    started: list = []
    supervisor = None
    try:
        shard_dirs = _shard_dirs(config, run_dir, "workers" in config.given)
        started = workers_lib.start_workers(
            shard_dirs,
            run_dir / "logs",
            base_port=config.federation.base_port,
            check=config.worker.shard_check,
            ready_timeout=config.worker.ready_timeout,
            max_message_mb=config.worker.max_message_mb,
            verbose=config.output.verbose,
        )
        r = config.resilience
        if r.worker_restarts:
            supervisor = workers_lib.Supervisor(
                started,
                max_restarts=r.worker_restarts,
                backoff=r.restart_backoff,
                ready_timeout=config.worker.ready_timeout,
            ).start()
        return run_training(config, [w.address for w in started], command="run")
    finally:
        if supervisor is not None:
            supervisor.stop()
        if started:
            log.info("stopping %d workers", len(started))
        workers_lib.stop_workers(started)
