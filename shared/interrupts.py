"""Ctrl-C and SIGTERM stop a run even when the interrupt lands inside a library.

A KeyboardInterrupt raised while gRPC is waiting on a call can come back as a
cancelled call, which clean-up code may rightly ignore; a run then went on
training after Ctrl-C. So the handler also remembers the signal, and loops ask
`raise_if_requested` between steps.
"""

from __future__ import annotations

import signal
import threading

_requested = threading.Event()
_signum: list[int] = []


def install() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt now and are remembered."""

    def handler(signum, _frame):
        _signum[:] = [signum]
        _requested.set()
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def requested() -> bool:
    """Whether SIGINT or SIGTERM arrived. The KeyboardInterrupt the handler
    raises can land inside TensorFlow or gRPC and come out as another error
    (seen: a TypeError from TensorFlow's eager context while TensorBoard was
    written); whatever escapes after a signal is the interrupt's doing."""
    return _requested.is_set()


def raise_if_requested() -> None:
    if _requested.is_set():
        raise KeyboardInterrupt(f"signal {_signum[0] if _signum else '?'}")
