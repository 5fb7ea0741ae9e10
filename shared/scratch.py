"""Private working directories in the system's temporary directory that no
death of their owner leaves behind for good.

A worker's executor needs a working directory (a link to its shard and its
`worker.json`), and so does the coordinator's server executor. An owner that
exits normally removes its directory; one killed by SIGKILL cannot. So each
directory holds a lock file that its owner keeps locked (`flock`) for as long
as it lives; the kernel drops the lock when the owner dies, however it dies.
Making a new directory first removes every directory of the same kind whose
lock nobody holds. Locks, unlike pids, are never recycled and work across
pid namespaces.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

PREFIX = "fedcompose-"
OWNER_FILE = ".owner"
_held: dict[Path, int] = {}


def make(kind: str, label: str = "") -> Path:
    """A new private directory `fedcompose-<kind>-[<label>-]*` in the temporary
    directory, locked for this process's life (or until `release`)."""
    remove_abandoned(kind)
    directory = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-{label + '-' if label else ''}"))
    # Locked before it gets its name, so a sweep never sees it unlocked.
    pending = directory / f"{OWNER_FILE}.new"
    fd = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.rename(pending, directory / OWNER_FILE)
    _held[directory] = fd
    return directory


def release(directory: Path) -> None:
    """Removes a directory made by `make` and drops its lock."""
    shutil.rmtree(directory, ignore_errors=True)
    fd = _held.pop(directory, None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def remove_abandoned(kind: str) -> list[Path]:
    """Removes the directories of `kind` whose owner has died."""
    removed = []
    root = Path(tempfile.gettempdir())
    for candidate in root.glob(f"{PREFIX}{kind}-*"):
        owner = candidate / OWNER_FILE
        try:
            fd = os.open(owner, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # not ours, or being made right now (its lock file is not in place yet)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its owner lives
        finally:
            os.close(fd)
        shutil.rmtree(candidate, ignore_errors=True)
        removed.append(candidate)
    return removed
