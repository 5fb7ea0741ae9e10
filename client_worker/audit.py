"""A worker's audit log: every refused connection and every call, one line each.

On by default, next to the worker's log (`worker-0.log` -> `worker-0.audit.log`)
or at `--audit-log`. Bounded: it rotates at `MAX_BYTES` and keeps `BACKUPS`
older files, so a flood of refused connections costs at most
`MAX_BYTES * (BACKUPS + 1)` of disk. Lines are `key=value` fields after a UTC
timestamp, values with spaces quoted, so that `grep` and `awk` read them.
"""

from __future__ import annotations

import io
import logging
import logging.handlers
import os
import time
from pathlib import Path

MAX_BYTES = 5 * 1024 * 1024
BACKUPS = 3


def _field(key: str, value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n\t'):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'
    return f"{key}={text}"


class _UTCFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + (
            f".{int(record.msecs):03d}Z"
        )


class _PrivateRotatingHandler(logging.handlers.RotatingFileHandler):
    """Every file it starts, after each rotation too, is private (0600)."""

    def _open(self) -> io.TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        # Appending, as the descriptor does (the handler's own mode is always "a" here).
        return open(fd, "a", encoding=self.encoding, errors=self.errors)


class AuditLog:
    """Writes audit lines to a rotating file (or nowhere, for `AuditLog(None)`)."""

    def __init__(self, path: Path | None, max_bytes: int = MAX_BYTES, backups: int = BACKUPS):
        self.path = path
        self._logger = logging.getLogger(f"fedcompose.audit.{id(self)}")
        self._logger.propagate = False
        self._logger.setLevel(logging.INFO)
        self._handler: logging.Handler | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Private: it names peers and certificates.
            self._handler = _PrivateRotatingHandler(
                path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
            )
            self._handler.setFormatter(_UTCFormatter("%(asctime)s %(message)s"))
            self._logger.addHandler(self._handler)

    def write(self, event: str, **fields: object) -> None:
        if self._handler is None:
            return
        parts = [event] + [_field(k, v) for k, v in fields.items() if v is not None]
        self._logger.info(" ".join(parts))

    def refused(self, peer: str, reason: str, **fields: object) -> None:
        self.write("refused", peer=peer, reason=reason, **fields)

    def close(self) -> None:
        if self._handler is not None:
            self._logger.removeHandler(self._handler)
            self._handler.close()
            self._handler = None


def default_path(log_file: Path | None, port: int) -> Path:
    """Next to the worker's log; without one, in the user's state directory."""
    if log_file is not None:
        return log_file.with_name(log_file.stem + ".audit.log")
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "fedcompose" / f"worker-{port}.audit.log"
