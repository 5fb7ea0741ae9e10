"""A command whose work is done leaves within `GRACE` seconds.

After a command returns, Python still joins every non-daemon thread (a
thread pool's worker inside a library call) and runs the exit handlers of
TensorFlow and gRPC. Once, in CI, an interrupted `fedcompose train` had
recorded how it stopped and printed its one line, and then did not exit for
two minutes: the machine that ran it kept no trace of where it waited. So a
command arms this guard when it has returned. If the process is still there
`GRACE` seconds later, every thread's stack goes to stderr (what held it,
for a bug report) and the process exits with the command's own code. If even
Python cannot run by then (stuck in a C++ exit handler), SIGALRM ends it.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading

GRACE = 20.0
MARKER = "fedcompose: still exiting after"
"""Begins the line before the stacks, so tests and logs can find it."""


def arm(code: int, grace: float = GRACE) -> None:
    def leave() -> None:
        try:
            sys.stderr.write(
                f"{MARKER} {grace:g} s (the run's results are written); "
                "the threads still running:\n"
            )
            sys.stderr.flush()
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stderr.flush()
        finally:
            os._exit(code)

    timer = threading.Timer(grace, leave)
    timer.daemon = True
    timer.start()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(int(2 * grace) + 1)
