"""Running the trainer as a command: logging, quiet TF, one-line errors."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from coordinator import config as config_lib
from shared import interrupts, logs
from shared.quiet import quiet_tensorflow

log = logging.getLogger("fedcompose.coordinator")


def prepare_run_dir(config: config_lib.RunConfig) -> Path:
    run_dir = Path(config.output.run_dir) if config.output.run_dir else config_lib.default_run_dir()
    config.output.run_dir = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def sigterm_as_interrupt() -> None:
    """SIGTERM stops a run like Ctrl-C does: cleanly, through `finally` blocks."""
    interrupts.install()


def run_training(config: config_lib.RunConfig, addresses: list[str], command: str) -> int:
    run_dir = prepare_run_dir(config)
    logs.setup(
        verbose=config.output.verbose, log_file=run_dir / "logs" / "coordinator.log", name=command
    )
    quiet_tensorflow(config.output.verbose)
    sigterm_as_interrupt()

    from coordinator import remote, trainer
    from coordinator.federation import FederationError
    from coordinator.run_dir import RunDirError

    try:
        summary = trainer.train(config, addresses, run_dir)
    except config_lib.ConfigError as e:
        print(f"fedcompose {command}: error: {e}", file=sys.stderr)
        return 2
    except (remote.WorkerError, FederationError, RunDirError) as e:
        print(f"fedcompose {command}: error: {e}", file=sys.stderr)
        log.debug("details", exc_info=True)
        return 1
    if summary.final_eval is not None:
        print(
            f"held-out accuracy {summary.final_eval['accuracy']:.4f} "
            f"(loss {summary.final_eval['loss']:.4f}) on {summary.final_eval['examples']} "
            f"test examples after {summary.rounds_completed} rounds; results in {run_dir}",
            file=sys.stderr,
        )
    return 0
