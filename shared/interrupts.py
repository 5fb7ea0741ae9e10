"""Ctrl-C, SIGTERM and SIGHUP stop a run even when the interrupt lands inside a library.

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
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt now and are remembered.

    SIGHUP (the terminal or SSH session closed) used to end a run on the spot,
    as SIGKILL does: status.json said `running` for a run that was gone. It
    stays ignored where it was (`nohup`), as the user asked.
    """

    def handler(signum, _frame):
        _signum[:] = [signum]
        _requested.set()
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, handler)


def raise_if_requested() -> None:
    if _requested.is_set():
        raise KeyboardInterrupt(f"signal {_signum[0] if _signum else '?'}")
