"""`fedcompose run`: the whole federation on this machine, from one command.

Builds (or reuses) worker shards, starts one client-worker process per shard,
runs the coordinator against their addresses, restarts a worker that crashes
meanwhile (bounded, with back-off: `workers.Supervisor`), and stops every
process at the end, on Ctrl-C, on SIGTERM and on errors.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

from shared import config as config_lib
from shared import files
from shared.errors import RunDirError, UsageError

log = logging.getLogger("fedcompose.launcher")


DESCRIPTION = (
    "Run a federation on this machine: build worker shards from the data (the offline "
    "sklearn-digits default unless told otherwise), start --workers client-worker "
    "processes, train with the coordinator, and stop everything at the end. "
    "Re-running with the same --run-dir resumes after the last checkpoint."
)


def _shard_dirs(config: config_lib.RunConfig, run_dir: Path, workers_given: bool) -> list[Path]:
    """The shards to serve: --shards-dir's, or built (or reused) in the run directory."""
    from deploy.data import build, progress

    if config.data.shards_dir:
        found = given_shards(config, workers_given)
        # One worker per shard, and the recorded config says so.
        config.federation.workers = len(found)
        return found
    log.info(
        "building %d worker shards from the %s data", config.federation.workers, config.data.source
    )
    target = run_dir / "shards"
    try:
        return build.build_shards(
            config.data, target, config.federation.workers, progress=progress.bar
        )
    except OSError as e:
        if not str(e.filename or "").startswith(str(target)):
            raise
        raise RunDirError(f"cannot write the run's shards: {files.failure(e)}") from None


def given_shards(config: config_lib.RunConfig, workers_given: bool) -> list[Path]:
    from deploy.data import shards

    root = Path(config.data.shards_dir)
    if not root.is_dir():
        raise UsageError(
            f"--shards-dir {root} "
            + ("is not a directory" if root.exists() else "does not exist")
            + "; build shards there with `fedcompose data`"
        )
    found = shards.existing_shards(root)
    if not found:
        raise UsageError(
            f"--shards-dir {root} holds no shard-NNN directories; build them with `fedcompose data`"
        )
    if workers_given and len(found) != config.federation.workers:
        raise UsageError(
            f"--workers {config.federation.workers} but --shards-dir {root} holds "
            f"{len(found)} shards (one per worker); leave out --workers"
        )
    _same_data(found)
    return found


def _same_data(found: list[Path]) -> None:
    """Shards of one federation hold examples of one element spec and encoding."""
    from shared import shard_format

    formats = []
    for shard in found:
        try:
            formats.append(shard_format.read_manifest(shard).data)
        except shard_format.ShardError:
            return  # the worker's own check names the damaged manifest
    for shard, data in zip(found[1:], formats[1:], strict=True):
        if data != formats[0]:
            raise UsageError(
                f"shards of different element specs: {found[0]} holds {formats[0].describe()}, "
                f"{shard} holds {data.describe()}; serve shards made by one build"
            )


def _check_before_changes(config: config_lib.RunConfig, run_dir: Path) -> bool:
    """Everything that can refuse this run from what is on disk, before the
    run directory changes (shards rebuilt, workers started). Returns whether
    the run is finished already."""
    from coordinator import run_dir as run_dir_lib

    run = run_dir_lib.RunDirectory(run_dir)
    plan = run_dir_lib.plan_resume(run, config, "run")
    if plan.finished or not plan.resuming:
        return plan.finished
    before = run.trained_on()
    if before is None:
        return False
    if config.data.shards_dir:
        manifests = _manifests(given_shards(config, "workers" in config.given))
        run.check_trained_on(
            run_dir_lib.data_record(manifests), where=f"--shards-dir {config.data.shards_dir} holds"
        )
    elif before.get("shards_built") != config.federation.workers:
        raise RunDirError(
            f"{run.path} was trained on {run_dir_lib.describe_record(before)}, but --workers "
            f"{config.federation.workers} would rebuild its shards for "
            f"{config.federation.workers} workers; resume it with --workers "
            f"{before.get('shards_built')}, or use a new --run-dir"
        )
    return False


def _check_built_shards(config: config_lib.RunConfig, run_dir: Path, found: list[Path]) -> None:
    """Before any worker starts: the shards are the ones the run was trained on."""
    from coordinator import run_dir as run_dir_lib

    run = run_dir_lib.RunDirectory(run_dir)
    manifests = _manifests(found)
    if run.latest_checkpoint() is not None:
        run.check_trained_on(
            run_dir_lib.data_record(manifests), where=f"the shards in {found[0].parent} are"
        )
    # Known from the manifests: no need to start the workers to find it out.
    hosted = sum(len(m.clients) for m in manifests)
    if config.training.clients_per_round > hosted:
        raise UsageError(
            f"--clients-per-round {config.training.clients_per_round} is more than the "
            f"{hosted} clients the shards in {found[0].parent} hold; lower it"
        )


def _manifests(shard_dirs: list[Path]) -> list:
    from shared import shard_format

    return [shard_format.read_manifest(d) for d in shard_dirs]


def _preload_coordinator(verbose: bool) -> None:
    """Imports TensorFlow, TFF and the coordinator (3 to 5 s of one core) in the
    background while the shards are built and the workers start, which is
    mostly waiting; the coordinator then finds them loaded. An import that
    fails here fails again, with its message, where the coordinator imports it."""
    from shared.quiet import quiet_tensorflow

    quiet_tensorflow(verbose)

    def load() -> None:
        with contextlib.suppress(BaseException):
            import coordinator.trainer  # noqa: F401

    threading.Thread(target=load, name="preload-coordinator", daemon=True).start()


def run(config: config_lib.RunConfig) -> int:
    from coordinator import run_dir as run_dir_lib
    from coordinator.cli import log_removed_temporaries, resolve_run_dir, run_training
    from deploy.local_federation import LocalWorkers
    from shared import interrupts, loopback

    # Every executor this starts is confined to loopback; without the shim, nothing starts.
    loopback.confine_children()
    run_dir = resolve_run_dir(config)
    # Held until the workers have stopped: they write their logs here.
    with run_dir_lib.locked(run_dir, "run") as removed:
        run_dir_lib.setup_logs(run_dir, "launcher.log", config.output.verbose, "run")
        log_removed_temporaries(removed)
        interrupts.install()
        if _check_before_changes(config, run_dir):
            return run_training(config, [], command="run")  # says so, starts nothing
        _preload_coordinator(config.output.verbose)
        shard_dirs = _shard_dirs(config, run_dir, "workers" in config.given)
        _check_built_shards(config, run_dir, shard_dirs)
        # The workers' lifecycle is the Python API's LocalFederation's.
        with LocalWorkers(shard_dirs, run_dir / "logs", config) as workers:
            return run_training(config, workers.addresses, command="run")
