"""Waiting out an outage: too few workers up to run a round at all.

The round deadline (`--round-timeout`) cuts stragglers short; it says nothing
about how long workers may be cut off. When the workers that are up host
fewer clients than a round needs (`--min-coverage` of `--clients-per-round`),
say every worker is behind a switch that reboots, no attempt can succeed and
none is made: the run waits, while the background probes (bounded back-off,
`--probe-interval-max`) look for the workers, up to `--outage-wait` seconds of
its own, and goes on as soon as enough of them are back (warmed up, see
`RoundExecutor.admit_rejoining`). Meanwhile it says so: a log line when the
wait starts, whenever the set of workers up changes and every
`REPORT_EVERY` seconds, and `status.json`'s `waiting` (which `fedcompose
status --run-dir` shows).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

from shared import interrupts
from shared.errors import FederationError

if TYPE_CHECKING:
    from coordinator.federation import Federation
    from coordinator.rounds.round_executor import RoundExecutor

log = logging.getLogger("fedcompose.coordinator")

REPORT_EVERY = 30.0
"""Seconds between two lines saying the run still waits (and status updates)."""

Report = Callable[[dict | None], None]
"""Told what the run waits for (a `Waiting.as_status()`), and None once it no
longer waits; the trainer writes it to `status.json`."""


def clients_on(federation: Federation, workers: Collection[int]) -> int:
    """Clients hosted by `workers`: the most a round could sample from them."""
    return sum(len(federation.descriptions[i].manifest.clients) for i in workers)


@dataclasses.dataclass
class Waiting:
    """What a run waits for: enough workers up for round `round`."""

    round: int
    needed: int
    """Clients the round must include (`--min-coverage` of `--clients-per-round`)."""
    limit: float
    since: float = dataclasses.field(default_factory=time.time)
    workers_up: list[int] = dataclasses.field(default_factory=list)
    workers_total: int = 0
    clients_up: int = 0
    down: list[str] = dataclasses.field(default_factory=list)
    """Workers not up, as `address (state)`."""

    @property
    def seconds(self) -> float:
        return max(0.0, time.time() - self.since)

    def what(self) -> str:
        return (
            f"round {self.round} needs {self.needed} clients; {len(self.workers_up)} of "
            f"{self.workers_total} workers up, hosting {self.clients_up}"
        )

    def line(self) -> str:
        return (
            f"waiting for workers to return: {self.what()}"
            + (f" (down: {', '.join(self.down)})" if self.down else "")
            + f"; waited {self.seconds:.0f}s, giving up in "
            f"{max(0.0, self.limit - self.seconds):.0f}s (--outage-wait {self.limit:g})"
        )

    def as_status(self) -> dict:
        return {
            "for": "workers",
            "round": self.round,
            "what": self.what(),
            "since": round(self.since, 3),
            "gives_up_at": round(self.since + self.limit, 3),
            "needed_clients": self.needed,
            "clients_up": self.clients_up,
            "workers_up": self.workers_up,
            "workers_total": self.workers_total,
            "down": self.down,
        }


def _down(federation: Federation) -> list[str]:
    if federation.liveness is None:
        return []
    return [
        f"{w['address']} ({w['state']})"
        for w in federation.liveness.snapshot()
        if w["state"] != "up"
    ]


def wait_out(
    executor: RoundExecutor,
    federation: Federation,
    *,
    round_num: int,
    needed: int,
    limit: float,
    clients_per_round: int | None = None,
    report: Report | None = None,
) -> float:
    """Waits until the workers up host at least `needed` clients; returns the
    seconds waited. Raises `FederationError` after `limit` seconds."""
    started = time.monotonic()
    waiting = Waiting(round_num, needed, limit, workers_total=len(federation.workers))
    said_at, said_up = -REPORT_EVERY, None
    try:
        while True:
            executor.admit_rejoining(clients_per_round)
            live = federation.live()
            if clients_on(federation, live) >= needed:
                if said_up is not None:
                    log.info(
                        "round %d goes on after %.0fs waiting: %d of %d workers up",
                        round_num, time.monotonic() - started, len(live), len(federation.workers),
                    )  # fmt: skip
                return time.monotonic() - started
            elapsed = time.monotonic() - started
            waiting.workers_up, waiting.clients_up = live, clients_on(federation, live)
            waiting.down = _down(federation)
            if elapsed >= limit:
                raise FederationError(
                    f"round {round_num} could not be run: it needs {needed} clients, and the "
                    f"{len(live)} of {len(federation.workers)} workers up host "
                    f"{waiting.clients_up}; too few came back within {limit:g}s (--outage-wait)"
                    + (f" (down: {'; '.join(waiting.down)})" if waiting.down else "")
                    + "; restart the workers that are down (or mend the network) and run the "
                    f"same command with the same --run-dir to resume after round {round_num - 1}"
                )
            if live != said_up or elapsed - said_at >= REPORT_EVERY:
                log.warning("round %d %s", round_num, waiting.line())
                if report is not None:
                    report(waiting.as_status())
                said_at, said_up = elapsed, live
            if federation.liveness is not None:
                federation.liveness.wait_for_change(min(1.0, limit - elapsed))
            else:
                time.sleep(min(1.0, limit - elapsed))
            interrupts.raise_if_requested()
    finally:
        if report is not None and said_up is not None:
            report(None)
