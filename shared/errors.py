"""The one error type users see, and the exit code each kind of it ends with.

Anything that goes wrong in a way a user can act on is raised as a
`FedcomposeError` whose message is one line: what is wrong, where (the path,
the worker, the flag), and what to do. `deploy.cli` turns it into
`fedcompose COMMAND: error: MESSAGE` and its exit code, in one place;
nothing else prints errors.

`EXIT_CODES` is the one list of exit codes: `fedcompose --help` and the
documentation's table are made from it.
"""

from __future__ import annotations

import dataclasses
import errno
import os


@dataclasses.dataclass(frozen=True)
class ExitCode:
    code: int
    kind: str
    """A word or two, as `fedcompose --help` lists the codes."""
    meaning: str


EXIT_CODES: tuple[ExitCode, ...] = (
    ExitCode(0, "ok", "success"),
    ExitCode(1, "failure", "a failure not covered below"),
    ExitCode(2, "usage", "an invalid flag, setting or config file"),
    ExitCode(3, "data", "a data source, shard or client file is missing or malformed"),
    ExitCode(4, "federation", "a worker is unreachable or failed, or the workers disagree"),
    ExitCode(
        5,
        "run directory",
        "held by another run, holding something other than a run, corrupt, or not writable",
    ),
    ExitCode(
        6,
        "training",
        "a client's update, the aggregate, the model or a held-out figure was not finite "
        "(NaN/inf), with `--on-non-finite fail` (the default)",
    ),
    ExitCode(130, "interrupted", "Ctrl-C, SIGTERM, or SIGHUP unless under `nohup`"),
)
_CODE = {c.kind: c.code for c in EXIT_CODES}
FAILURE = _CODE["failure"]
INTERRUPTED = _CODE["interrupted"]


class FedcomposeError(Exception):
    """An error whose message is fit to show a user as is."""

    exit_code = FAILURE


class UsageError(FedcomposeError):
    """An invalid flag, setting or config file; the message names it."""

    exit_code = _CODE["usage"]


class DataError(FedcomposeError):
    """A data source, shard or client file is missing, unreadable or malformed."""

    exit_code = _CODE["data"]


class FederationError(FedcomposeError):
    """A worker is unreachable or failed, or the workers do not form one federation."""

    exit_code = _CODE["federation"]


class RunDirError(FedcomposeError):
    """The run directory cannot be used: locked, another run's, corrupt or unwritable."""

    exit_code = _CODE["run directory"]


class TrainingError(FedcomposeError):
    """Training produced a non-finite value (NaN/inf); the message names the
    round and, where one is to blame, the client and its worker."""

    exit_code = _CODE["training"]


def describe_os_error(e: OSError, doing: str = "") -> str:
    """`OSError` as one line that names the path, with a hint for the usual causes."""
    path = e.filename if e.filename is not None else ""
    reason = e.strerror or str(e)
    hint = {
        errno.ENOSPC: "free some space or choose another directory",
        errno.EDQUOT: "free some space or choose another directory",
        errno.EACCES: "check its permissions",
        errno.EPERM: "check its permissions",
        errno.EROFS: "choose a writable directory",
        errno.EISDIR: "give a file, not a directory",
        errno.ENOTDIR: "a part of the path is a file, not a directory",
    }.get(e.errno or 0, "")
    where = f"{os.fspath(path)}: " if path != "" else ""
    what = f"cannot {doing}: " if doing else ""
    return f"{what}{where}{reason}" + (f" ({hint})" if hint else "")


def one_line(error: BaseException | str, limit: int | None = 200) -> str:
    """An error (or its text) as one line to quote inside a message: whitespace
    collapsed, at most `limit` characters. An exception other than a
    `FedcomposeError` is prefixed with its type, which is often the only
    clue when its text is terse (`KeyError: 'round'`)."""
    if isinstance(error, BaseException):
        text = " ".join(str(error).split())
        if not isinstance(error, FedcomposeError):
            text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    else:
        text = " ".join(error.split())
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
