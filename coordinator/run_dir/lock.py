"""One user of a run directory at a time: its `flock`, taken for the process's
life, and the sweep of what killed writers left, done under it."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from coordinator.run_dir.checkpoints import CHECKPOINT_PREFIX
from shared import files
from shared.errors import RunDirError

LOCK_NAME = ".lock"
# What TFF's own writers leave when killed midway: `<target>_temp<4 digits>`.
_TFF_TEMPORARY = re.compile(rf"^({CHECKPOINT_PREFIX}\d+|metrics\.csv)_temp\d{{4}}$")


@dataclasses.dataclass
class _Held:
    fd: int
    count: int


_held: dict[str, _Held] = {}


@contextlib.contextmanager
def locked(directory: Path, command: str) -> Iterator[list[Path]]:
    """Makes `directory` (if needed) and holds its lock while the block runs.

    Re-entrant within a process (`run` holds it while its coordinator takes
    it again). On first taking it, removes the temporaries that killed
    writers left, and yields their paths (for the caller to log once its
    logging is set up). Raises `RunDirError` if the path is not a usable
    directory or another process holds the lock.
    """
    key = os.path.realpath(directory)
    fresh = key not in _held and _is_new(directory)
    _make_directory(directory)
    removed: list[Path] = []
    if key in _held:
        _held[key].count += 1
    else:
        _refuse_foreign(directory)
        _held[key] = _Held(_lock(directory, command), 1)
        removed = remove_temporaries(directory)
    failed = True
    try:
        yield removed
        failed = False
    finally:
        held = _held[key]
        held.count -= 1
        if held.count == 0:
            del _held[key]
            if failed and fresh:
                _remove_if_unused(directory)
            os.close(held.fd)  # releases the lock


def _is_new(directory: Path) -> bool:
    """Whether `directory` does not exist yet or is empty (as `runs/<time>` is)."""
    try:
        return not any(directory.iterdir())
    except FileNotFoundError:
        return True
    except OSError:
        return False


_BEFORE_USE = frozenset({LOCK_NAME, "logs"})
"""What a run directory holds before the command that made it used it."""


def _remove_if_unused(directory: Path) -> None:
    """Removes a run directory that this command made and then refused or
    stopped before recording anything in it: a new directory left holding only
    `.lock` and `logs/` looked like a run (`train --clients-per-round 1e9`
    refused after connecting left them). Under the lock, before it is dropped."""
    try:
        others = [directory / name for name in os.listdir(directory) if name not in _BEFORE_USE]
        # An empty directory (`shards/` after a failed build removed its shards) holds nothing.
        if all(p.is_dir() and not p.is_symlink() and not any(p.iterdir()) for p in others):
            shutil.rmtree(directory)
    except OSError:
        pass  # left as it is: it holds nothing a later start trips on


def _make_directory(directory: Path) -> None:
    try:
        is_file = directory.exists() and not directory.is_dir()
    except OSError as e:  # a parent we may not search
        raise RunDirError(f"--run-dir {directory} cannot be used: {files.failure(e)}") from None
    if is_file:
        raise RunDirError(f"--run-dir {directory} exists and is not a directory; give a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"--run-dir {directory} cannot be created: {files.failure(e)}") from None


RUN_ENTRIES = frozenset(
    {
        LOCK_NAME,
        "config.toml",
        "status.json",
        "trained_on.json",
        "workers.json",
        "metrics.csv",
        "metrics.jsonl",
        "metrics.png",
        "final_model.npz",
        "tensorboard",
        "checkpoints",
        "logs",
        "shards",
    }
)
"""What a run keeps in its directory (and nothing else is needed to call it one)."""


def _refuse_foreign(directory: Path) -> None:
    """Refuses a directory that holds other things and no run (`--run-dir .`,
    `--run-dir ~`): a run would overwrite a config.toml or metrics.csv of
    someone else's there, and its start-up sweep of temporaries would search
    (and clean) the whole tree below it. A directory that a fedcompose
    command ever locked has `.lock`; an empty one, or one holding only what a
    run keeps, is a run's too."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return  # taking the lock says what is wrong, naming the file
    if LOCK_NAME in entries:
        return
    foreign = sorted(
        name
        for name in entries
        if name not in RUN_ENTRIES
        and not files.is_temporary_name(name)
        and not _TFF_TEMPORARY.match(name)
    )
    if foreign:
        shown = ", ".join(foreign[:3]) + (
            f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        )
        raise RunDirError(
            f"--run-dir {directory} is not a fedcompose run directory (it holds {shown}); "
            "give a new or empty directory"
        )


def _lock(directory: Path, command: str) -> int:
    path = directory / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise RunDirError(f"--run-dir {directory} cannot be used: {files.failure(e)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise RunDirError(
            f"--run-dir {directory} is in use by another fedcompose ({holder}); wait for it "
            "to end or stop it, or choose another --run-dir"
        ) from None
    except OSError as e:
        os.close(fd)
        raise RunDirError(
            f"--run-dir {directory}: cannot lock {path} ({e.strerror}); use a run directory "
            "on a local file system"
        ) from None
    since = datetime.datetime.now().isoformat(timespec="seconds")
    holder = f"fedcompose {command}, pid {os.getpid()} on {socket.gethostname()}, since {since}"
    # Who holds it, for the refusal message; not needed for the lock itself.
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode() + b"\n", 0)
    return fd


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 300, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "pid unknown"


def remove_temporaries(directory: Path) -> list[Path]:
    """Removes what killed writers left. Only under the lock: no writer lives."""
    removed = files.remove_stale_temporaries(directory, recursive=True, writers_may_live=False)
    for place in (directory, directory / "checkpoints"):
        with contextlib.suppress(OSError):
            for entry in place.iterdir():
                if _TFF_TEMPORARY.match(entry.name):
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
                    removed.append(entry)
    return removed
