"""How the run directory's files are read and written: one-line errors naming
the file, appends that land whole or not at all, free names to set files aside."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from shared import files
from shared.errors import RunDirError


@contextlib.contextmanager
def writing(what: str, path: Path) -> Iterator[None]:
    """Turns a failed write (OSError or TensorFlow's file errors) into one
    line naming `path`."""
    try:
        yield
    except RunDirError:
        raise
    except Exception as e:
        if not files.is_file_error(e):
            raise
        raise RunDirError(f"cannot write {what}: {files.failure(e, path)}") from None


def append_whole(path: Path, data: bytes) -> None:
    """Appends `data` whole or not at all: a write that fails (a full disk)
    is cut back to where it began, so no line is left half written."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def aside_name(path: Path) -> Path:
    """`path`, or `path.N` for the first N that is free."""
    aside, n = path, 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.{n}")
    return aside


def read_text(path: Path, what: str) -> str | None:
    """A file of the run, or None if it does not exist; `what` says what to do
    about a corrupt one."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise RunDirError(
            f"{path} is corrupt (not UTF-8 text); {what}, or use a new --run-dir"
        ) from None
    except OSError as e:
        raise RunDirError(f"cannot read {files.failure(e, path)}") from None
