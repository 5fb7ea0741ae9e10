"""Running TFF's coroutines (its program state and release managers) from
synchronous code, inside a notebook too.

A Jupyter kernel runs every cell inside its own asyncio event loop, where
`asyncio.run` refuses to start another ("cannot be called from a running
event loop"). TFF's notebooks answer with nest-asyncio, which patches asyncio
for the whole kernel. Here the coroutine runs instead to completion on a
fresh loop in a short-lived thread of its own: nothing global changes, and
the caller waits as it would for `asyncio.run`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(coroutine)`, also where an event loop is running already."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = asyncio.run(coroutine)
        except BaseException as e:  # handed to the caller, whatever it is
            outcome["error"] = e

    thread = threading.Thread(target=target, name="fedcompose-coroutine", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
