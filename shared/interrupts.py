"""Ctrl-C, SIGTERM and SIGHUP stop a run even when the interrupt lands inside a library.

A KeyboardInterrupt raised while gRPC is waiting on a call can come back as a
cancelled call, which clean-up code may rightly ignore; a run then went on
training after Ctrl-C. So the handler also remembers the signal, and loops ask
`raise_if_requested` between steps.

Never inside the import machinery, though: an exception raised there can
leave Python's global import lock held, and every import in every thread then
waits forever. `fedcompose run` imports TensorFlow in a thread while its main
thread imports too, and a SIGTERM landing in that window hung the launcher
for good, its workers started and its run directory locked. Such a signal is
delivered again a moment later, until the main thread is out of the import.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

_requested = threading.Event()
_signum: list[int] = []


def install() -> None:
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt now and are remembered.

    SIGHUP (the terminal or SSH session closed) used to end a run on the spot,
    as SIGKILL does: status.json said `running` for a run that was gone. It
    stays ignored where it was (`nohup`), as the user asked.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        _signum[:] = [signum]
        _requested.set()
        if _importing(frame):
            # A real signal, so that a blocking call the main thread is in by
            # then is interrupted as by the first one.
            main = threading.main_thread().ident
            later = threading.Timer(REDELIVER_SECONDS, signal.pthread_kill, (main, signum))
            later.daemon = True
            later.start()
            return
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, handler)


REDELIVER_SECONDS = 0.05


def _importing(frame: FrameType | None) -> bool:
    """Whether `frame` or a caller of it is Python's import machinery."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def requested() -> bool:
    """Whether SIGINT, SIGTERM or SIGHUP arrived. The KeyboardInterrupt the handler
    raises can land inside TensorFlow or gRPC and come out as another error
    (seen: a TypeError from TensorFlow's eager context while TensorBoard was
    written); whatever escapes after a signal is the interrupt's doing."""
    return _requested.is_set()


def raise_if_requested() -> None:
    if _requested.is_set():
        raise KeyboardInterrupt(f"signal {_signum[0] if _signum else '?'}")
