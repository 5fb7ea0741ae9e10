"""Pinned mode: each measured process on cores of its own, TensorFlow sized to them.

On a machine with few cores, W = 2 workers unpinned mostly measure two
processes competing for the same cores while TFF's single process already
uses all of them. Pinning asks the question the project lives on: what does
each added worker's core add? Worker i (and its `worker_binary`, which
inherits the affinity across fork and exec) runs on core i; TFF in one
process and the Keras floor run on one core; the coordinator, whose share of
a round is small, is left unpinned so that W = 1 and W = 2 treat it alike.

The affinity is set before the program starts (this module re-executes the
command), so every thread TensorFlow or gRPC starts inherits it, and
TensorFlow's thread pools are sized to the cores given, explicitly rather
than through its reading of the affinity mask.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

THREAD_ENV = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS")


def available_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def core_for_worker(index: int) -> int:
    """Worker `index`'s core; more workers than cores share them round-robin."""
    cores = available_cores()
    return cores[index % len(cores)]


def single_core() -> int:
    """The core of the one-process baselines (TFF's local context, Keras)."""
    return available_cores()[0]


def prefix(cores: Sequence[int]) -> list[str]:
    """What to put before a command to run it on `cores` only."""
    return [sys.executable, "-m", __name__, ",".join(str(c) for c in cores), "--"]


def main(argv: Sequence[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m deploy.bench.pinning CORE[,CORE...] -- COMMAND...", file=sys.stderr)
        return 2
    cores = {int(c) for c in argv[0].split(",")}
    os.sched_setaffinity(0, cores)
    for name in THREAD_ENV:
        os.environ[name] = str(len(cores))
    os.execvp(argv[2], list(argv[2:]))
    return 127  # pragma: no cover - execvp does not return


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
