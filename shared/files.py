"""Writing files so that a crash, a full disk or SIGKILL never leaves half of one.

Every file fedcompose writes for later reading (configs, status, manifests,
client files, metrics, plots, models) goes through `write_atomic` or
`atomic_target`: the content is written to a temporary file beside the target
and renamed over it, so a reader sees the old file or the new one, never a
mix. Temporary files are named `.<name>.tmp-<pid>`, so that a later start can
find and remove the ones a killed writer left behind
(`remove_stale_temporaries`). A failed write names the file it was writing,
never the temporary (`failure`, for errors TensorFlow raises as well).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from shared.errors import describe_os_error

_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)(?P<suffix>\.[A-Za-z0-9]+)?$")


def temporary_path(path: Path, suffix: str = "") -> Path:
    """Where `path`'s content is written before it is renamed into place.

    `suffix` keeps an extension that a library insists on (`np.savez` adds
    `.npz`, matplotlib picks the format from it).
    """
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")


def is_temporary_name(name: str) -> bool:
    """Whether `name` is one of `temporary_path`'s."""
    return _TMP.match(name) is not None


def write_atomic(path: Path, data: str | bytes, *, sync: bool = False) -> None:
    """Replaces `path` with `data` in one step; on failure, `path` is unchanged
    and no temporary file is left."""
    with atomic_target(path, sync=sync) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_target(path: Path, suffix: str = "", *, sync: bool = False) -> Iterator[Path]:
    """Yields a temporary path to write; renames it over `path` if the block
    succeeds, removes it if not. An `OSError` names `path`, not the temporary."""
    tmp = temporary_path(path, suffix)
    try:
        yield tmp
        if sync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.filename in (str(tmp), tmp, None):
            e.filename = str(path)
        raise


def sync_dir(directory: Path) -> None:
    """Flushes a directory's entries (a rename into it) to disk."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot sync a directory
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Removes a directory so that a crash midway leaves a temporary (cleaned
    at the next start), never a half-deleted directory under its own name."""
    doomed = temporary_path(path)
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(
    directory: Path, recursive: bool = False, *, writers_may_live: bool = True
) -> list[Path]:
    """Removes temporary files in `directory` whose writer is no longer running.

    `writers_may_live=False` removes them whatever their pid says: for a
    directory whose lock we hold, where no other writer can be at work (and
    a recycled pid must not keep a dead writer's leftovers alive).
    """
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    candidates = directory.rglob(".*.tmp-*") if recursive else directory.glob(".*.tmp-*")
    for candidate in list(candidates):
        match = _TMP.match(candidate.name)
        if match is None or (writers_may_live and _alive(int(match.group("pid")))):
            continue
        with contextlib.suppress(OSError):
            if candidate.is_dir() and not candidate.is_symlink():
                shutil.rmtree(candidate)
            else:
                candidate.unlink()
            removed.append(candidate)
    return removed


_REASONS = {
    code: os.strerror(code)
    for code in (
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.EIO,
        errno.EISDIR,
        errno.ENOTDIR,
        errno.ENOENT,
    )
}


def failure(e: BaseException, path: Path | str | None = None) -> str:
    """What a failed file operation says, as one line naming the path.

    Understands `OSError` and the errors TensorFlow's file layer raises (its
    messages carry the C library's reason, e.g. "No space left on device",
    but often no path, and sometimes several lines).
    """
    if isinstance(e, OSError):
        if e.filename is None and path is not None:
            e = OSError(e.errno, e.strerror or str(e), str(path))
        return describe_os_error(e)
    text = " ".join(str(e).split())
    for code, reason in _REASONS.items():
        if reason.lower() in text.lower():
            return describe_os_error(OSError(code, reason, str(path) if path else None))
    where = f"{path}: " if path is not None else ""
    return f"{where}{type(e).__name__}: {text[:300]}"


def is_file_error(e: BaseException) -> bool:
    """An `OSError`, or an error of TensorFlow's file layer (whose classes
    this module does not import)."""
    if isinstance(e, OSError):
        return True
    return type(e).__module__.startswith("tensorflow") and "Error" in type(e).__name__
