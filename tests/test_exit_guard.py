"""A command that has returned leaves even when a thread would hold it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from shared import exit_guard

HELD = textwrap.dedent(
    """
    import threading, time
    from shared import exit_guard

    def stuck_in_a_library_call():
        time.sleep(3600)

    threading.Thread(target=stuck_in_a_library_call, name="held").start()  # not a daemon
    exit_guard.arm(130, grace={grace})
    """
)


def _run(grace: float, body: str = HELD) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", body.format(grace=grace)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result, time.monotonic() - started


def test_a_thread_that_holds_the_exit_is_shown_and_the_code_kept():
    result, took = _run(1.0)
    assert result.returncode == 130, result.stderr
    assert exit_guard.MARKER in result.stderr
    assert "stuck_in_a_library_call" in result.stderr  # where it waited
    assert took < 60  # not the thread's hour


def test_a_clean_exit_is_not_delayed_and_prints_nothing():
    body = "from shared import exit_guard\nexit_guard.arm(0, grace={grace})\n"
    result, _ = _run(30.0, body)
    assert result.returncode == 0
    assert result.stderr == ""
