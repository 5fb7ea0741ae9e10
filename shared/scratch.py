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

`private_tempdir` gives a whole process such a directory for the temporary
files of the libraries it runs: TensorFlow writes a
`__autograph_generated_file*.py` module to the temporary directory for every
function it converts and removes them only at a normal exit, so a process
killed mid-run left dozens of them in `$TMPDIR` for good.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

PREFIX = "fedcompose-"
OWNER_FILE = ".owner"
TEMPDIR_KIND = "tmp"
_held: dict[Path, int] = {}
_system_root: Path | None = None
"""The system's temporary directory, once `private_tempdir` has replaced it
for this process."""


def root() -> Path:
    """Where scratch directories live: the system's temporary directory."""
    return _system_root or Path(tempfile.gettempdir())


def make(kind: str, label: str = "") -> Path:
    """A new private directory `fedcompose-<kind>-[<label>-]*` in the temporary
    directory, locked for this process's life (or until `release`)."""
    remove_abandoned(kind)
    directory = Path(
        tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-{label + '-' if label else ''}", dir=root())
    )
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
    """Removes the directories of `kind` (`*`: of every kind) whose owner has died."""
    removed = []
    for candidate in root().glob(f"{PREFIX}{kind}-*"):
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


def private_tempdir() -> Path | None:
    """Makes this process's temporary files (Python's `tempfile`, hence
    TensorFlow's autograph modules) go to a scratch directory of its own,
    removed at exit and, if the process is killed, by the next fedcompose
    process to start. Children keep the system's temporary directory (the
    environment is not changed). Returns the directory, or None if the system's
    temporary directory cannot take one (then nothing changes)."""
    global _system_root
    if _system_root is not None:
        return Path(tempfile.gettempdir())
    try:
        remove_abandoned("*")  # a killed coordinator's server directory too
        directory = make(TEMPDIR_KIND)
    except OSError:
        return None
    _system_root = Path(tempfile.gettempdir())
    tempfile.tempdir = str(directory)
    # Registered before TensorFlow's own removals, so it runs after them.
    atexit.register(release, directory)
    return directory
