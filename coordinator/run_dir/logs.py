"""Logging to the terminal and into the run directory's `logs/`."""

from __future__ import annotations

from pathlib import Path

from shared.errors import RunDirError, UsageError


def setup_logs(directory: Path, name: str, verbose: bool, command: str) -> None:
    """Logging to the terminal and to `logs/<name>` in the run directory."""
    from shared import logs

    try:
        logs.setup(verbose=verbose, log_file=directory / "logs" / name, name=command)
    except UsageError as e:  # the log file cannot be opened: a run directory problem
        raise RunDirError(str(e)) from None
