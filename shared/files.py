"""Writing files so that a crash, a full disk or SIGKILL never leaves half of one.

Every file fedcompose writes for later reading (configs, status, manifests,
client files, metrics, plots, models) goes through `write_atomic` or
`atomic_target`: the content is written to a temporary file beside the target
and renamed over it, so a reader sees the old file or the new one, never a
mix. Temporary files are named `.<name>.tmp-<pid>`, so that a later start can
find and remove the ones a killed writer left behind
(`remove_stale_temporaries`).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)(?P<suffix>\.[A-Za-z0-9]+)?$")


def temporary_path(path: Path, suffix: str = "") -> Path:
    """Where `path`'s content is written before it is renamed into place.

    `suffix` keeps an extension that a library insists on (`np.savez` adds
    `.npz`, matplotlib picks the format from it).
    """
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")


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
    succeeds, removes it if not."""
    tmp = temporary_path(path, suffix)
    try:
        yield tmp
        if sync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


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


def remove_stale_temporaries(directory: Path, recursive: bool = False) -> list[Path]:
    """Removes temporary files in `directory` whose writer is no longer running."""
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    candidates = directory.rglob(".*.tmp-*") if recursive else directory.glob(".*.tmp-*")
    for candidate in candidates:
        match = _TMP.match(candidate.name)
        if match is None or _alive(int(match.group("pid"))):
            continue
        with contextlib.suppress(OSError):
            if candidate.is_dir() and not candidate.is_symlink():
                import shutil

                shutil.rmtree(candidate)
            else:
                candidate.unlink()
            removed.append(candidate)
    return removed
