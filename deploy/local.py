"""`fedcompose run`: the whole federation on this machine, from one command.

Builds (or reuses) worker shards, starts one client-worker process per shard,
runs the coordinator against their addresses, and stops every process at the
end, on Ctrl-C, on SIGTERM and on errors.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from coordinator import config as config_lib

log = logging.getLogger("fedcompose.launcher")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="fedcompose run")
    parser.description = (
        "Run a federation on this machine: build worker shards from the data (the offline "
        "sklearn-digits default unless told otherwise), start --workers client-worker "
        "processes, train with the coordinator, and stop everything at the end. "
        "Re-running with the same --run-dir resumes after the last checkpoint."
    )
    config_lib.add_arguments(parser, exclude=("addresses",))
    return parser


def _shard_dirs(config: config_lib.RunConfig, run_dir: Path) -> list[Path]:
    from deploy import datasets, progress, shards

    if config.data.shards_dir:
        found = shards.existing_shards(Path(config.data.shards_dir))
        if not found:
            raise config_lib.ConfigError(
                f"--shards-dir {config.data.shards_dir} holds no shard-NNN directories; "
                "build them with `fedcompose data`"
            )
        return found
    log.info(
        "building %d worker shards from the %s data", config.federation.workers, config.data.source
    )
    return datasets.build_shards(
        config.data_spec(), run_dir / "shards", config.federation.workers, progress=progress.bar
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = config_lib.resolve(args)
    except config_lib.ConfigError as e:
        print(f"fedcompose run: error: {e}", file=sys.stderr)
        return 2

    from coordinator import session
    from deploy import workers as workers_lib
    from deploy.sources import DataSourceError
    from shared import logs
    from shared.shard_format import ShardError

    run_dir = session.prepare_run_dir(config)
    logs.setup(
        verbose=config.output.verbose, log_file=run_dir / "logs" / "launcher.log", name="run"
    )
    session.sigterm_as_interrupt()
    started: list = []
    try:
        shard_dirs = _shard_dirs(config, run_dir)
        started = workers_lib.start_workers(
            shard_dirs,
            run_dir / "logs",
            base_port=config.federation.base_port,
            check=config.federation.worker_check,
            verbose=config.output.verbose,
        )
        return session.run_training(config, [w.address for w in started], command="run")
    except config_lib.ConfigError as e:
        print(f"fedcompose run: error: {e}", file=sys.stderr)
        return 2
    except (workers_lib.LaunchError, DataSourceError, ShardError, ValueError, OSError) as e:
        print(f"fedcompose run: error: {e}", file=sys.stderr)
        return 1
    finally:
        if started:
            log.info("stopping %d workers", len(started))
        workers_lib.stop_workers(started)
