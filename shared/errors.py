"""The one error type users see, and the exit code each kind of it ends with.

Anything that goes wrong in a way a user can act on is raised as a
`FedcomposeError` whose message is one line: what is wrong, where (the path,
the worker, the flag), and what to do. `deploy.cli` turns it into
`fedcompose COMMAND: error: MESSAGE` and the exit code below, in one place;
nothing else prints errors.

Exit codes (also in README, *Commands*):

    0    success
    1    a failure not covered below
    2    usage: an invalid flag, setting or config file
    3    data: a data source, shard or client file is missing or malformed
    4    federation: a worker is unreachable, failed, or the workers disagree
    5    run directory: locked by another run, holds another run, or unwritable
    6    training: a client's update, the aggregate, the model or a held-out figure
         was not finite (NaN/inf) and --on-non-finite is fail
    130  interrupted (Ctrl-C, SIGTERM, SIGHUP)
"""

from __future__ import annotations

import errno
import os


class FedcomposeError(Exception):
    """An error whose message is fit to show a user as is."""

    exit_code = 1


class UsageError(FedcomposeError):
    """An invalid flag, setting or config file; the message names it."""

    exit_code = 2


class DataError(FedcomposeError):
    """A data source, shard or client file is missing, unreadable or malformed."""

    exit_code = 3


class FederationError(FedcomposeError):
    """A worker is unreachable or failed, or the workers do not form one federation."""

    exit_code = 4


class RunDirError(FedcomposeError):
    """The run directory cannot be used: locked, another run's, corrupt or unwritable."""

    exit_code = 5


class TrainingError(FedcomposeError):
    """Training produced a non-finite value (NaN/inf); the message names the
    round and, where one is to blame, the client and its worker."""

    exit_code = 6


INTERRUPTED = 130


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
