"""A test hook: the coordinator pauses at a named point of a named round.

Tests that must act at an exact moment (kill a round's finisher while it
merges) set, in the coordinator's environment,

    FEDCOMPOSE_TEST_PAUSE=PHASE:ROUND:FILE      e.g. finish:3:/tmp/pause.json

(several, separated by `;`). When round ROUND reaches PHASE for the first
time, the coordinator writes what it is about to do (JSON: phase, round, and
e.g. the finisher's address) to FILE, then waits until FILE is removed (at
most `MAX_PAUSE` seconds). Nobody else sets the variable; unset, `pause`
returns at once.

Phases: `dispatch` (the round's clients are sampled, nothing is sent yet),
`finish` (every partial is merged on the finisher; `after_merge` not started).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from shared import files

ENV = "FEDCOMPOSE_TEST_PAUSE"
MAX_PAUSE = 120.0

log = logging.getLogger("fedcompose.coordinator")
_done: set[tuple[str, int]] = set()


def pause(phase: str, round_num: int, **info: object) -> None:
    specs = os.environ.get(ENV)
    if not specs or (phase, round_num) in _done:
        return
    for spec in specs.split(";"):
        want_phase, want_round, path = spec.split(":", 2)
        if want_phase == phase and int(want_round) == round_num:
            break
    else:
        return
    _done.add((phase, round_num))
    target = Path(path)
    files.write_atomic(target, json.dumps({"phase": phase, "round": round_num, **info}))
    log.info("test hook: paused at %s of round %d until %s is removed", phase, round_num, path)
    deadline = time.monotonic() + MAX_PAUSE
    while target.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
