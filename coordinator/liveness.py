"""Which workers are up, and taking back the ones that went down.

A worker is in one of four states:

    up         takes part in rounds
    down       lost in a round (killed, unreachable, past a deadline, an error);
               probed in the background, with back-off
    rejoining  answered a probe serving the same shard as before (same manifest,
               hence the same build and clients); its executors are built in the
               background (`on_answer`), off the round path, and once that is done
               (`mark_ready`) it joins at the start of the next round
    refused    answered a probe serving another shard; not taken back, and probed
               on at the longest back-off in case the right worker returns

Probes run in a thread per down worker, each on a channel of its own (the
worker's own channel may hold calls abandoned mid-round), so a stopped worker
delays only its own probe. Only the round loop moves a worker from rejoining to
up (`take_rejoining`, then `mark_up`), between rounds, after resetting what the
coordinator knew about the worker and warming it up. A probe that succeeds
resets the back-off: a worker that flapped is probed from `--probe-interval`
again next time (a growing back-off kept a rejoining worker out for good).

The coordinator's view is also written to a file (`workers.json` in the run
directory) on every change, for `fedcompose status --run-dir`.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from shared import files, shard_format
from shared.errors import FederationError

if TYPE_CHECKING:
    from coordinator.federation import WorkerDescription

log = logging.getLogger("fedcompose.coordinator")

WORKERS_VIEW = "workers.json"
"""The coordinator's view of its workers, kept current in the run directory."""

FLAPPING_STREAK = 10
"""Rounds a worker must deliver in a row after coming back before a new outage
starts its probe back-off from the beginning again."""

STOP_GRACE = 0.5
"""Seconds `Liveness.stop` waits, for all probe threads together."""


class WorkerState(enum.StrEnum):
    UP = "up"
    DOWN = "down"
    REJOINING = "rejoining"
    REFUSED = "refused"


def backoff(base: float, maximum: float, attempt: int) -> float:
    """The wait before probe `attempt` (0, 1, ...): `base` doubling up to `maximum`."""
    return min(maximum, base * 2.0 ** min(attempt, 60))


def same_shard(expected: shard_format.Manifest, found: shard_format.Manifest) -> bool:
    """Whether a worker that came back serves the very shard it served before."""
    return found == expected


def describe_shard(manifest: shard_format.Manifest) -> str:
    return (
        f"build {manifest.build_id}, shard {manifest.shard_index + 1} of {manifest.num_shards}, "
        f"{len(manifest.clients)} clients"
    )


@dataclasses.dataclass
class WorkerHealth:
    index: int
    address: str
    state: WorkerState = WorkerState.UP
    since: float = dataclasses.field(default_factory=time.time)
    reason: str = ""
    outages: int = 0
    rejoins: int = 0
    streak: int = 0
    """Rounds delivered in a row since the last outage."""
    flaps: int = 0
    """Outages that followed a rejoin within `FLAPPING_STREAK` rounds: each
    doubles the first probe's wait."""
    probes: int = 0
    """Probes of the current outage so far."""
    next_probe_in: float = 0.0
    ready: bool = False
    """Rejoining, and warmed up: joins at the next round."""

    def as_dict(self) -> dict:
        return {
            "index": self.index,
            "address": self.address,
            "state": self.state.value,
            "since": self.since,
            "reason": self.reason,
            "outages": self.outages,
            "rejoins": self.rejoins,
            "probes": self.probes,
            "next_probe_in": round(self.next_probe_in, 1),
        }


Probe = Callable[[int], "WorkerDescription"]
"""Reaches worker `i` on a fresh channel and returns what it serves and who it
is; raises `FederationError` when it cannot."""


class Liveness:
    """The coordinator's view of every worker, and the probes of down ones."""

    def __init__(
        self,
        descriptions: Sequence[WorkerDescription],
        probe: Probe,
        *,
        probe_interval: float = 1.0,
        probe_interval_max: float = 30.0,
        view_path: Path | None = None,
    ):
        self._workers = [WorkerHealth(i, d.address) for i, d in enumerate(descriptions)]
        self._expected = list(descriptions)
        self._probe = probe
        self.probe_interval = probe_interval
        self.probe_interval_max = max(probe_interval, probe_interval_max)
        self.view_path = view_path
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._changed = threading.Condition(self._lock)
        self._threads: dict[int, threading.Thread] = {}
        self._view_lock = threading.Lock()
        """The view's temporary file is per process: one writer at a time."""
        self.on_answer: Callable[[int], None] | None = None
        """Called (on the probe's thread) when worker i answers serving its shard:
        it warms the worker up, then calls `mark_ready` or `rejoin_failed`. None:
        the worker is ready at once."""
        self._write_view()

    # --- the round loop's side ------------------------------------------------

    def live(self) -> list[int]:
        with self._lock:
            return [w.index for w in self._workers if w.state is WorkerState.UP]

    def state(self, index: int) -> WorkerState:
        with self._lock:
            return self._workers[index].state

    def health(self, index: int) -> WorkerHealth:
        with self._lock:
            return dataclasses.replace(self._workers[index])

    def mark_down(self, index: int, reason: str) -> None:
        """Takes a worker out of rounds and starts probing it."""
        with self._lock:
            w = self._workers[index]
            if w.state is not WorkerState.UP:
                return
            if w.rejoins and w.streak < FLAPPING_STREAK:
                w.flaps += 1
            elif w.streak >= FLAPPING_STREAK:
                w.flaps = 0
            w.state, w.since, w.reason = WorkerState.DOWN, time.time(), reason
            w.outages += 1
            w.streak = 0
            w.probes = 0
            self._start_probing(w)
        log.warning("worker %s is down: %s; probing it in the background", w.address, reason)
        self._write_view()

    def delivered(self, index: int) -> None:
        """The worker's partial made it into a round."""
        with self._lock:
            self._workers[index].streak += 1

    def take_rejoining(self) -> list[int]:
        """Workers ready to join now (warmed up); the caller calls `mark_up`."""
        with self._lock:
            return [w.index for w in self._workers if w.state is WorkerState.REJOINING and w.ready]

    def rejoining(self) -> list[int]:
        """Workers that answered and are not ready yet (being warmed up)."""
        with self._lock:
            return [
                w.index for w in self._workers if w.state is WorkerState.REJOINING and not w.ready
            ]

    def mark_ready(self, index: int, detail: str = "") -> None:
        """A rejoining worker was warmed up: it joins at the next round."""
        with self._changed:
            w = self._workers[index]
            if w.state is not WorkerState.REJOINING:
                return
            w.ready = True
            w.reason = f"warmed up{f' ({detail})' if detail else ''}; joins at the next round"
            self._changed.notify_all()
        self._write_view()

    def rejoin_failed(self, index: int, reason: str) -> None:
        """A rejoining worker failed while being warmed up: down again, probed from
        the shortest wait (it did answer)."""
        with self._changed:
            w = self._workers[index]
            if w.state is not WorkerState.REJOINING:
                return
            w.state, w.reason, w.ready = WorkerState.DOWN, f"failed warming up: {reason}", False
            w.probes = 0
            self._start_probing(w)
            self._changed.notify_all()
        log.warning("worker %s failed while warming up to rejoin: %s", w.address, reason)
        self._write_view()

    def mark_up(self, index: int) -> None:
        with self._lock:
            w = self._workers[index]
            down_for = time.time() - w.since
            w.state, w.since, w.reason, w.ready = WorkerState.UP, time.time(), "", False
            w.rejoins += 1
        log.info(
            "worker %s rejoined after %.1fs down; its clients are sampled again",
            w.address,
            down_for,
        )
        self._write_view()

    def wait_for_change(self, timeout: float) -> None:
        """Sleeps up to `timeout` s, waking early when a probe changes a worker's state."""
        with self._changed:
            self._changed.wait(timeout)

    def snapshot(self) -> list[dict]:
        with self._lock:
            return [w.as_dict() for w in self._workers]

    def stop(self) -> None:
        """Ends the probing. A probe in flight is not waited for (past a short
        grace for all together): across a partition it can take its whole
        deadline, and waiting 2 s for each in turn held a run that gave up for
        6 s before it said so. Its thread sees the stop when the probe ends."""
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        deadline = time.monotonic() + STOP_GRACE
        for thread in list(self._threads.values()):
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    # --- probing ----------------------------------------------------------------

    def _start_probing(self, w: WorkerHealth) -> None:
        """Called with the lock held."""
        thread = self._threads.get(w.index)
        if thread is not None and thread.is_alive():
            return  # its loop sees the new outage
        thread = threading.Thread(
            target=self._probe_loop, args=(w.index,), name=f"probe-{w.index}", daemon=True
        )
        self._threads[w.index] = thread
        thread.start()

    def _probe_loop(self, index: int) -> None:
        refused_logged: set[str] = set()
        while not self._stop.is_set():
            with self._lock:
                w = self._workers[index]
                if w.state in (WorkerState.UP, WorkerState.REJOINING):
                    # Under the lock: a new outage from now on starts a new thread.
                    self._threads.pop(index, None)
                    return
                wait = backoff(self.probe_interval, self.probe_interval_max, w.probes + w.flaps)
                if w.state is WorkerState.REFUSED:
                    wait = self.probe_interval_max
                w.next_probe_in = wait
            self._write_view()
            if self._stop.wait(wait):
                return
            with self._lock:
                w.probes += 1
            try:
                found = self._probe(index)
            except FederationError as e:
                log.debug("probe of worker %s: %s", w.address, e)
                continue
            except Exception as e:  # a probe must never end the probing
                log.debug("probe of worker %s failed: %r", w.address, e)
                continue
            expected = self._expected[index].manifest
            with self._lock:
                if self._stop.is_set() or w.state not in (WorkerState.DOWN, WorkerState.REFUSED):
                    self._threads.pop(index, None)
                    return
                if same_shard(expected, found.manifest):
                    before = self._expected[index].info
                    restarted = (found.info.pid, found.info.started_at) != (
                        before.pid,
                        before.started_at,
                    )
                    self._expected[index] = found
                    w.state, w.ready = WorkerState.REJOINING, self.on_answer is None
                    w.reason = (
                        "answered; joins at the next round"
                        if w.ready
                        else "answered; building its executors before it joins a round"
                    )
                    w.next_probe_in = 0.0
                    # It answered: the next outage's probes start from the shortest wait.
                    w.flaps = 0
                    self._changed.notify_all()
                else:
                    w.state = WorkerState.REFUSED
                    w.reason = f"serves another shard ({describe_shard(found.manifest)})"
            if w.state is WorkerState.REJOINING:
                log.info(
                    "worker %s answers again (%s), serving its shard; it rejoins at the next "
                    "round%s",
                    w.address,
                    f"restarted, pid {found.info.pid}" if restarted else "the same process",
                    "" if w.ready else " after its executors are built",
                )
                self._write_view()
                on_answer = self.on_answer
                if on_answer is not None:
                    on_answer(index)
                continue  # ends the loop, unless warming up failed meanwhile
            identity = describe_shard(found.manifest)
            if identity not in refused_logged:
                refused_logged.add(identity)
                log.error(
                    "worker %s came back serving another shard (%s) than it served when the "
                    "run started (%s); it is not taken back: restart it with its own shard",
                    w.address,
                    identity,
                    describe_shard(expected),
                )
            self._write_view()

    def _write_view(self) -> None:
        if self.view_path is None:
            return
        try:
            with self._view_lock:
                view = {"updated_at": time.time(), "workers": self.snapshot()}
                files.write_atomic(self.view_path, json.dumps(view, indent=1))
        except OSError as e:  # the view is for people; a full disk must not stop rounds
            log.debug("cannot write %s: %s", self.view_path, e)
