"""Logging set-up shared by every command: short lines on stderr, full in a file.

A log file that cannot be written (full disk, a directory given as the file)
must not take the program down or spray tracebacks: opening it fails with one
line naming the path, and a write that fails later switches file logging off
with one warning on the terminal.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from shared.errors import UsageError, describe_os_error


class _ResilientFileHandler(logging.FileHandler):
    """A file handler that, when a write fails, says so once and stops."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if self.failed:
            return
        self.failed = True
        error = sys.exc_info()[1]
        reason = describe_os_error(error) if isinstance(error, OSError) else str(error)
        try:
            print(
                f"fedcompose: warning: log file {self.baseFilename} cannot be written "
                f"({reason}); logging to the terminal only",
                file=sys.stderr,
                flush=True,
            )
        except OSError:
            pass

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def flush(self) -> None:
        try:
            super().flush()
        except OSError:  # buffered lines a full disk refused: reported once, dropped
            self.handleError(logging.LogRecord("fedcompose", logging.ERROR, "", 0, "", None, None))

    def close(self) -> None:
        try:
            super().close()
        except OSError:
            # The stream is closed even when its last flush fails. FileHandler.close
            # sets None itself; typeshed declares the attribute without None.
            self.stream = None  # type: ignore[assignment]


def setup(verbose: bool = False, log_file: Path | None = None, name: str = "fedcompose") -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(
        logging.Formatter(f"%(asctime)s {name} %(levelname)s %(message)s", "%H:%M:%S")
    )
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.addHandler(console)
    if log_file is not None:
        handler = resilient_file_handler(log_file)
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
        )
        root.addHandler(handler)
    for noisy in ("tensorflow", "absl", "jax", "h5py", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.ERROR)


def resilient_file_handler(log_file: Path) -> logging.FileHandler:
    """A DEBUG-level handler appending to `log_file` (its directory made); a
    file that cannot be opened is one line naming it (`UsageError`), one that
    fails later is one warning, then nothing."""
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = _ResilientFileHandler(log_file)
    except FileExistsError:  # mkdir met a file where the directory belongs
        raise UsageError(
            f"log file {log_file}: {log_file.parent} exists and is not a directory"
        ) from None
    except OSError as e:
        if e.filename is None:  # Python's append mode seeks after opening, unnamed
            e.filename = str(log_file)
        raise UsageError(f"log file: {describe_os_error(e)}") from None
    handler.setLevel(logging.DEBUG)
    return handler


def to_files_only(level: int, message: str) -> None:
    """Writes `message` to the log files, not the terminal (which has it already)."""
    record = logging.LogRecord("fedcompose", level, __file__, 0, message, None, None)
    handlers = [*logging.getLogger().handlers, *logging.getLogger("fedcompose").handlers]
    for handler in handlers:
        if isinstance(handler, logging.FileHandler) and level >= handler.level:
            handler.handle(record)
