"""`fedcompose train`: train over client workers that are already running."""

from __future__ import annotations

import datetime
import logging
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
    from shared import loopback, tls

    # A kit or shim problem is a one-line error before the run directory is touched.
    if config.tls.tls_dir:
        tls.load_kit(config.tls.tls_dir, tls.COORDINATOR)
    loopback.confine_children()
    return run_training(config, list(config.federation.addresses), command="train")


def default_run_dir() -> Path:
    """A new directory under runs/, named by the time; made here, so that two runs
    started in the same second each get one of their own (`-2`, `-3`, ...)."""
    base = Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            candidate.mkdir(parents=True)
        except FileExistsError:
            continue
        except OSError:
            return candidate  # the run-directory checks say what is wrong, in one line
        return candidate
    return base


def resolve_run_dir(config: config_lib.RunConfig) -> Path:
    """The run directory (given, or a new one under runs/), recorded in the config."""
    run_dir = Path(config.output.run_dir) if config.output.run_dir else default_run_dir()
    config.output.run_dir = str(run_dir)
    return run_dir


def log_removed_temporaries(removed: list[Path]) -> None:
    if removed:
        logging.getLogger("fedcompose").info(
            "removed %d temporary file(s) a killed run left: %s",
            len(removed),
            ", ".join(str(p) for p in removed[:5]) + (" ..." if len(removed) > 5 else ""),
        )


def run_training(config: config_lib.RunConfig, addresses: list[str], command: str) -> int:
    """Trains as a command does: the run directory locked, logs in it,
    TensorFlow quiet, SIGTERM stopping the run like Ctrl-C, the result in
    one line."""
    from coordinator import run_dir as run_dir_lib
    from shared import interrupts
    from shared.quiet import quiet_tensorflow

    run_dir = resolve_run_dir(config)
    with run_dir_lib.locked(run_dir, command) as removed:
        run_dir_lib.setup_logs(run_dir, "coordinator.log", config.output.verbose, command)
        log_removed_temporaries(removed)
        quiet_tensorflow(config.output.verbose)
        interrupts.install()

        # Refusals that need only the directory come before TensorFlow loads.
        run_dir_lib.plan_resume(run_dir_lib.RunDirectory(run_dir), config, command)
        from coordinator import trainer
        from coordinator.privacy import accountant as privacy

        summary = trainer.train(config, addresses, run_dir, command=command)
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
