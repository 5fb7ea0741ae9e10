"""A run's records written beside its rounds, by a thread of their own.

A round's metrics rows and checkpoint used to be written between rounds,
and cost more than a short round itself. The trainer now hands each round's
records to a `RecordWriter` and starts the next round at once; the writer
writes them in order, one round after another.

* Back-pressure: the queue holds at most `depth` rounds. A trainer that gets
  ahead of the disk waits for room, so memory stays bounded.
* What is handed over is the trainer's no longer: the row is built for the
  writer, and a checkpoint's leaves are copies (`run_dir.state_leaves`).
* A write that fails stops the writer; its error (one line, `RunDirError`)
  is raised in the trainer at its next hand-over or at `close`, and the run
  stops with it as before.
* status.json is written at most once per `status_every` seconds while rounds
  come quickly (and within that time after the last one), and always at
  `close`; a run that stops sets it from the files (`note_stopped`).
* `abandon` (an interrupt, a failure elsewhere) still writes what was
  handed over (at most `depth` rounds and the one being written), so a run
  that stops keeps every round it finished; it waits at most
  `ABANDON_WAIT`. A writer held at a test's pause point is stopped by the
  signal instead (`pause_points`), and what waits is dropped: rounds after
  the newest checkpoint are run again on resume, so none is lost and none
  recorded twice.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import numpy as np

from coordinator.run_dir import RunDirectory
from shared import pause_points

log = logging.getLogger("fedcompose.coordinator")

DEPTH = 2
"""Rounds that may wait to be written: enough to absorb one slow write (a
checkpoint behind a short round), small enough that a writer that falls
behind holds the trainer back within a round or two."""
STATUS_EVERY = 1.0
ABANDON_WAIT = 30.0
"""How long an interrupted run waits for the write in progress (a checkpoint
being flushed) before it records how it stopped."""

_CLOSE = object()


class RecordWriter:
    def __init__(
        self,
        run: RunDirectory,
        checkpoint_round: int,
        *,
        depth: int = DEPTH,
        status_every: float = STATUS_EVERY,
    ):
        self.run = run
        self.status_every = status_every
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._failure: BaseException | None = None
        self._status: dict[str, Any] = {}
        self._status_at = time.monotonic()
        self._checkpoint_round = checkpoint_round
        self._thread = threading.Thread(target=self._serve, name="fedcompose-records", daemon=True)
        self._thread.start()

    # --- the trainer's side ----------------------------------------------------------

    def round_done(self, row: dict, leaves: list[np.ndarray] | None = None) -> None:
        """Hands over a round's metrics row and, if it is checkpointed, its
        server state's leaves; waits while `depth` rounds are waiting."""
        while True:
            self.raise_if_failed()
            try:
                self._queue.put((row, leaves), timeout=0.2)
                return
            except queue.Full:
                continue

    def raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._failure

    def close(self) -> None:
        """Writes everything handed over, status.json included; raises the
        writer's error if it failed."""
        while self._thread.is_alive():
            self.raise_if_failed()
            try:
                self._queue.put(_CLOSE, timeout=0.2)
                break
            except queue.Full:
                continue
        self._thread.join()
        self.raise_if_failed()

    def abandon(self) -> None:
        """Writes what was handed over, waiting at most `ABANDON_WAIT`, and
        never raises: the run is stopping for another reason."""
        deadline = time.monotonic() + ABANDON_WAIT
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:
                self._queue.put(_CLOSE, timeout=0.2)
                break
            except queue.Full:
                continue
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.warning("the record writer is still writing; stopping without it")

    # --- the writer's side -----------------------------------------------------------

    def _serve(self) -> None:
        try:
            while True:
                try:
                    job = self._queue.get(timeout=self._until_status())
                except queue.Empty:
                    self._write_status(due_only=True)
                    continue
                if job is _CLOSE:
                    break
                self._write_round(*job)
                self._write_status(due_only=True)
            self._write_status(due_only=False)
        except BaseException as e:  # raised in the trainer's thread
            self._failure = e
        finally:
            try:
                self.run.close()
            except Exception as e:
                self._failure = self._failure or e

    def _write_round(self, row: dict, leaves: list[np.ndarray] | None) -> None:
        round_num = int(row["round"])
        pause_points.reached("record", round_num)
        self.run.record_round(row)
        if leaves is not None:
            self.run.save_leaves(round_num, leaves)
            self._checkpoint_round = round_num
        self._status.update(completed_rounds=round_num, checkpoint_round=self._checkpoint_round)

    def _until_status(self) -> float | None:
        if not self._status:
            return None
        return max(0.01, self._status_at + self.status_every - time.monotonic())

    def _write_status(self, due_only: bool) -> None:
        if not self._status:
            return
        if due_only and time.monotonic() < self._status_at + self.status_every:
            return
        fields, self._status = self._status, {}
        self.run.write_status(**fields)
        self.run.flush_tensorboard()
        self._status_at = time.monotonic()
