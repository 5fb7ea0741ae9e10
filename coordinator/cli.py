"""`fedcompose train`: train over client workers that are already running."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

from shared import config as config_lib

DESCRIPTION = (
    "Compose the learning algorithm from TFF's building blocks (distributor, client work, "
    "aggregator, finalizer: see `fedcompose blocks`) and train over running workers "
    "(`fedcompose worker`). Only worker addresses are needed: the coordinator learns "
    "what each worker hosts from the worker itself and never reads shard files. "
    "Restarting with the same --run-dir resumes after the last checkpoint."
)


def run(config: config_lib.RunConfig) -> int:
    return run_training(config, list(config.federation.addresses), command="train")


def default_run_dir() -> Path:
    return Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def prepare_run_dir(config: config_lib.RunConfig) -> Path:
    run_dir = Path(config.output.run_dir) if config.output.run_dir else default_run_dir()
    config.output.run_dir = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def run_training(config: config_lib.RunConfig, addresses: list[str], command: str) -> int:
    """Trains as a command does: logs in the run directory, TensorFlow quiet,
    SIGTERM stopping the run like Ctrl-C, the result in one line."""
    from shared import interrupts, logs
    from shared.quiet import quiet_tensorflow

    run_dir = prepare_run_dir(config)
    logs.setup(
        verbose=config.output.verbose, log_file=run_dir / "logs" / "coordinator.log", name=command
    )
    quiet_tensorflow(config.output.verbose)
    interrupts.install()

    from coordinator import trainer
    from coordinator.algorithm import privacy

    summary = trainer.train(config, addresses, run_dir)
    if summary.final_eval is not None:
        print(
            f"held-out accuracy {summary.final_eval['accuracy']:.4f} "
            f"(loss {summary.final_eval['loss']:.4f}) on {summary.final_eval['examples']} "
            f"test examples after {summary.rounds_completed} rounds"
            + (f", {privacy.describe(summary.privacy)}" if summary.privacy else "")
            + f"; results in {run_dir}",
            file=sys.stderr,
        )
    return 0
