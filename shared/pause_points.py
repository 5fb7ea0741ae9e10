"""Named points in a run where a test can hold the process, to fault it there.

Tests must deliver signals, kill processes and fill disks at an exact phase
of a round (start-up, training, evaluation, checkpointing); timing alone
cannot aim that well. When the environment names a point,

    FEDCOMPOSE_PAUSE_AT=checkpoint:3   (point, optionally :round)
    FEDCOMPOSE_PAUSE_FILE=/some/path

the process writes the point's name to the file on reaching it and then
waits, sleeping, until the file is removed; a signal that arrives meanwhile
is handled exactly as it would be at that point of the code. Unset (always,
outside tests), `reached` is one dictionary lookup.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV_POINT = "FEDCOMPOSE_PAUSE_AT"
ENV_FILE = "FEDCOMPOSE_PAUSE_FILE"

POINTS = ("startup", "round", "evaluation", "checkpoint", "finish")
"""startup: run directory locked, workers not yet contacted; round: a round
is about to start; evaluation: about to evaluate; checkpoint: the
checkpoint is written but not yet in place; finish: all rounds done, the
final model not yet written."""


def reached(point: str, round_num: int | None = None) -> None:
    wanted = os.environ.get(ENV_POINT)
    if not wanted:
        return
    name, _, at_round = wanted.partition(":")
    if name != point or (at_round and round_num is not None and int(at_round) != round_num):
        return
    marker = Path(os.environ[ENV_FILE])
    marker.write_text(f"{point} {round_num if round_num is not None else ''}".strip() + "\n")
    while marker.exists():
        time.sleep(0.05)
