"""Deciding how a command starts on a run directory, from the directory alone."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from shared import settings
from shared.config import COMMANDS, SECTIONS, RunConfig, resume_conflicts
from shared.errors import RunDirError

if TYPE_CHECKING:
    from coordinator.run_dir.directory import RunDirectory

log = logging.getLogger("fedcompose.coordinator")


@dataclasses.dataclass
class ResumePlan:
    status: dict
    latest: int | None
    """The newest checkpoint by name (it may yet prove unreadable)."""
    finished: bool
    """Finished and nothing left to do at the configured number of rounds."""

    @property
    def resuming(self) -> bool:
        return self.latest is not None


def _compared_settings(config: RunConfig, command: str) -> set[str]:
    """Settings the command takes and therefore can have changed; data
    settings do not describe shards served from --shards-dir (their
    manifests, checked against trained_on.json, do)."""
    names = {f.name for section, f in COMMANDS[command].fields(SECTIONS)}
    if config.data.shards_dir:
        names -= {f.name for f in dataclasses.fields(SECTIONS["data"])}
    return names


def plan_resume(run: RunDirectory, config: RunConfig, command: str) -> ResumePlan:
    """Checks that `config` may continue what `run` holds, reading only.

    Raises `RunDirError` naming every setting that would change the run.
    """
    run.check_layout()
    saved = run.saved_config()
    if saved is not None:
        conflicts = resume_conflicts(saved, config, _compared_settings(config, command))
        if conflicts:
            raise RunDirError(
                f"{run.path} holds a run with other settings ({'; '.join(conflicts)}); "
                f"resume it with its own config (--config {run.config_path}) or use a new "
                "--run-dir"
            )
    status = run.status()
    latest = run.latest_checkpoint()
    finished = (
        latest is not None
        and latest >= config.training.rounds
        and status.get("state") == "finished"
    )
    if latest is not None and not finished and not run.trained_on_path.exists():
        # Without the record, a resume on another build of the data went on
        # without a word, and then recorded that build as the run's.
        if not config.output.accept_unrecorded_data:
            raise RunDirError(
                f"{run.path} has checkpoints (up to round {latest}) but no trained_on.json, the "
                "record of the data it was trained on, so the data cannot be checked: restore "
                "the file, or resume with --accept-unrecorded-data to take the data the workers "
                "serve now as the run's"
            )
        log.warning(
            "%s has no trained_on.json: resuming on the data the workers serve now "
            "(--accept-unrecorded-data), which is recorded as the run's",
            run.path,
        )
    return ResumePlan(status, latest, finished)


def config_to_record(saved: dict | None, config: RunConfig, command: str) -> str:
    """The config.toml to write: this command's settings, and the saved values
    of settings it does not take (`train` resuming a `run` keeps its data)."""
    values = config.to_dict()
    taken = {f.name for _, f in COMMANDS[command].fields(SECTIONS)}
    for section, fields in (saved or {}).items():
        if section not in values or not isinstance(fields, dict):
            continue
        for name, value in fields.items():
            if name in values[section] and name not in taken:
                values[section][name] = value
    return settings.to_toml(
        values, "fedcompose run configuration (resolved: defaults, config file, flags)"
    )
