"""How the benchmark talks to the processes it measures.

Each measured system (plain Keras, TFF in one process, the fedcompose
coordinator) runs in a child process of its own, so that its memory can be
measured alone and TFF's global state never leaks between systems. A child
gets its settings as one JSON argument and reports JSON lines on stdout:

    {"event": "start", "workload": KEY}     a workload's rounds begin
    {"event": "round", "workload": KEY, ...} one round, warm-up or measured
    {"event": "end", "workload": KEY}       a workload's rounds are done

Everything else a child prints goes to stderr, which the benchmark keeps in
a log file.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

# The real stdout, taken before TensorFlow or TFF can print anything to it.
_OUT: TextIO = sys.stdout


def take_stdout() -> None:
    """Keeps stdout for events: anything else printed goes to stderr."""
    global _OUT
    _OUT = sys.stdout
    sys.stdout = sys.stderr


def start_child() -> None:
    """What every measured child does first: stdout kept for events, SIGTERM
    and Ctrl-C stopping it through `finally` blocks, TensorFlow's start-up
    noise kept out of the log."""
    from shared import interrupts
    from shared.quiet import quiet_tensorflow

    take_stdout()
    interrupts.install()
    quiet_tensorflow()


def emit(event: str, **fields: Any) -> None:
    _OUT.write(json.dumps({"event": event, **fields}) + "\n")
    _OUT.flush()


def workload_key(model: str, clients_per_round: int) -> str:
    return f"{model}/{clients_per_round}"


def parse(line: str) -> dict | None:
    """An event from a child's stdout line, or None for anything else."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and "event" in event else None
