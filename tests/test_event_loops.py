"""TFF's coroutines run from synchronous code inside a running event loop (a notebook)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from shared import event_loops


async def _where() -> str:
    await asyncio.sleep(0)
    return threading.current_thread().name


async def _fails() -> None:
    raise ValueError("from the coroutine")


def test_without_a_running_loop_it_is_asyncio_run():
    assert event_loops.run(_where()) == threading.current_thread().name


def test_inside_a_running_loop_it_runs_to_completion_and_raises_what_the_coroutine_raised():
    async def cell() -> str:
        # What a notebook cell does: synchronous code, called in the kernel's loop.
        refused = _where()
        with pytest.raises(RuntimeError):
            asyncio.run(refused)
        refused.close()
        with pytest.raises(ValueError, match="from the coroutine"):
            event_loops.run(_fails())
        return event_loops.run(_where())

    assert asyncio.run(cell()) == "fedcompose-coroutine"
