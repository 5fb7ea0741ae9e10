"""Starting and stopping child processes so that none outlives its owner.

Every child is started with PR_SET_PDEATHSIG, so the kernel kills it when the
thread that started it dies, even by SIGKILL. Owners also stop children
explicitly (SIGTERM, then SIGKILL after a grace period) on normal exit and on
signals.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

_PR_SET_PDEATHSIG = 1
_libc: ctypes.CDLL | None = None


def _prctl_pdeathsig(sig: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    _libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


PARENT_ENV = "FEDCOMPOSE_PARENT_PID"
"""Set by `spawn` for a child that asks for its death signal itself: the
parent it must die with, so that a parent that died before the child asked
is noticed too."""


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Asks the kernel to send `sig` to this process when its parent dies, if
    a fedcompose process started it to supervise it (`spawn` said so in the
    environment). Returns whether it did.

    A process a user started (`fedcompose worker ... &` in a script, over
    `ssh`, under `nohup`) must outlive the shell that started it: that shell
    exits at once, and the death signal used to stop the worker 0.6 s after
    it was ready. The marker is taken out of the environment, so that nothing
    this process starts mistakes itself for a supervised child.
    """
    marked = os.environ.pop(PARENT_ENV, "")
    if not marked.isdigit():
        return False
    _prctl_pdeathsig(sig)
    if os.getppid() != int(marked):  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)
    return True


def spawn(
    args: Sequence[str],
    *,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    death_signal: int | None = signal.SIGKILL,
) -> subprocess.Popen:
    """Starts `args` as a child that the kernel kills when we die.

    `death_signal=None`: the child asks for it itself (`die_with_parent`, as
    `fedcompose worker` does). Then no Python code runs between fork and exec,
    which is what makes starting a child safe from a thread of a process that
    has gRPC running (a fork there can crash or hang it).
    """

    def preexec() -> None:
        assert death_signal is not None
        _prctl_pdeathsig(death_signal)
        # A child of ours ignores Ctrl-C in the terminal; we stop it ourselves,
        # in order, instead of racing the terminal's SIGINT.
        os.setpgrp()

    if death_signal is None:
        env = {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}
    return subprocess.Popen(
        list(args),
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        preexec_fn=preexec if death_signal is not None else None,
        process_group=None if death_signal is not None else 0,
        close_fds=True,
    )


def stop(proc: subprocess.Popen, grace: float = 5.0, sig: int = signal.SIGTERM) -> int | None:
    """Stops `proc` (and its process group): `sig`, then SIGKILL after `grace` s."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        os.killpg(proc.pid, sig)
        # A stopped process (SIGSTOP) acts on `sig` only once it runs again.
        os.killpg(proc.pid, signal.SIGCONT)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
            proc.send_signal(signal.SIGCONT)
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    return proc.wait()
