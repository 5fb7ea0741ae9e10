"""Named points in a run where a test can hold the process, to fault it there.

Tests must deliver signals, kill processes and fill disks at an exact phase
of a round; timing alone cannot aim that well. When the environment names
points,

    FEDCOMPOSE_PAUSE_AT=checkpoint:3             a point, optionally :ROUND
    FEDCOMPOSE_PAUSE_FILE=/some/path             the file it is announced in
    FEDCOMPOSE_PAUSE_AT="dispatch:5=/tmp/a;merged:7=/tmp/b"   several, each its file

the process, on reaching a named point (once per point and round), writes
JSON to the file (the point, the round, and what the code says it is about
to do, e.g. the round's finisher), then waits, sleeping, until the file is
removed (at most `MAX_PAUSE` seconds, so a test that dies cannot leave a
process held for ever). A signal that arrives meanwhile is handled exactly
as it would be at that point; in a thread other than the main one (the
record writer), which no signal reaches, a signal ends the wait with
KeyboardInterrupt, as the main thread's would. Unset (always, outside tests), `reached` is one
dictionary lookup.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from shared import interrupts

ENV_POINT = "FEDCOMPOSE_PAUSE_AT"
ENV_FILE = "FEDCOMPOSE_PAUSE_FILE"
MAX_PAUSE = 600.0

POINTS = (
    "startup",
    "round",
    "dispatch",
    "merged",
    "evaluation",
    "record",
    "checkpoint",
    "finish",
)
"""startup: run directory locked, workers not yet contacted; round: a round
is about to start; dispatch: the round's clients are sampled, nothing is sent
yet; merged: every partial is merged on the round's finisher, `after_merge`
not started; evaluation: about to evaluate; record: the record writer is about to
write a round's metrics (the trainer runs on meanwhile); checkpoint: the
checkpoint is written but not yet in place (by the record writer too);
finish: all rounds done, the final model not
yet written."""

log = logging.getLogger("fedcompose")
_done: set[tuple[str, int | None]] = set()


def _wanted(point: str, round_num: int | None) -> Path | None:
    specs = os.environ.get(ENV_POINT)
    if not specs:
        return None
    for spec in specs.split(";"):
        where, _, path = spec.partition("=")
        name, _, at_round = where.partition(":")
        # A test that names a point wrongly must fail at once, not wait for ever.
        if name not in POINTS or (at_round and not at_round.isdigit()):
            raise ValueError(f"{ENV_POINT}: cannot read {spec!r}; points: {', '.join(POINTS)}")
        if name != point or (at_round and at_round != str(round_num)):
            continue
        path = path or os.environ.get(ENV_FILE, "")
        return Path(path) if path else None
    return None


def reached(point: str, round_num: int | None = None, **info: object) -> None:
    assert point in POINTS, point
    marker = _wanted(point, round_num)
    if marker is None or (point, round_num) in _done:
        return
    _done.add((point, round_num))
    body = json.dumps({"point": point, "round": round_num, **info})
    temporary = marker.with_name(marker.name + ".tmp")
    temporary.write_text(body + "\n")
    temporary.replace(marker)  # the test never reads a half-written file
    log.info("test hook: paused at %s (round %s) until %s is removed", point, round_num, marker)
    deadline = time.monotonic() + MAX_PAUSE
    in_main = threading.current_thread() is threading.main_thread()
    while marker.exists() and time.monotonic() < deadline:
        if not in_main and interrupts.requested():
            raise KeyboardInterrupt(f"interrupted while paused at {point}")
        time.sleep(0.05)
