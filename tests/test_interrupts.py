"""A signal whose KeyboardInterrupt surfaces as another error is still an interrupt.

The handler raises KeyboardInterrupt wherever the main thread is; inside
TensorFlow's C++ code it came out as a TypeError ("Was eager Context
initialized?") while TensorBoard was written, and `fedcompose run` exited 1
with a traceback instead of 130 with one line.
"""

from __future__ import annotations

import os
import signal

import pytest

from deploy import cli
from shared import interrupts


@pytest.fixture
def fresh_interrupts(monkeypatch):
    monkeypatch.setattr(interrupts, "_requested", type(interrupts._requested)())
    monkeypatch.setattr(interrupts, "_signum", [])
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


def _body_interrupted_inside_a_library():
    interrupts.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
    except KeyboardInterrupt as e:
        # What TensorFlow's C++ code made of it.
        raise TypeError("Expected `context` argument ... Was eager Context initialized?") from e
    raise AssertionError("the handler did not raise")


def test_an_error_after_a_signal_is_reported_as_the_interrupt(fresh_interrupts, capsys):
    assert cli.run_reporting("run", _body_interrupted_inside_a_library) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fedcompose run: interrupted"]


def test_the_same_error_without_a_signal_is_not_hidden(fresh_interrupts):
    def body():
        raise TypeError("a bug")

    with pytest.raises(TypeError, match="a bug"):
        cli.run_reporting("run", body)
