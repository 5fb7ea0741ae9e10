"""Which executors a worker keeps, and at which client count a round runs.

TFF's executor service builds a new executor (TensorFlow sessions for every
computation) for each number of clients it is sent, which costs tens to
hundreds of milliseconds; sampling gives a worker a different number almost
every round. So a worker's clients are padded with empty clients up to one
of a few counts (at most a quarter more), the executors for those counts are
kept for reuse within a budget (least recently used go first), and the first
round with a new number of clients per round builds, ahead, the executors for
the counts sampling will likely give each worker.

Pure policy, no gRPC: `RoundExecutor` asks it what to run at and what to free,
and tells the worker's client to do so.
"""

from __future__ import annotations

import collections
import math

EXECUTOR_BUDGET = 256
"""Clients a worker's kept executors may serve in all. An executor holds its
clients' TensorFlow state (about 16 MB per client for the CNN, measured with
`fedcompose bench`); without a bound, executors kept for reuse ran four CNN
workers at 1,000 clients per round out of memory on a 24 GiB machine."""


def padded_count(clients: int) -> int:
    """The client count a worker runs `clients` clients at.

    Exact up to 8; above, rounded up to one of four steps per power of two
    (10, 12, 14, 16, 20, 24, ...), so at most 25% of the clients are empty ones.
    """
    if clients <= 8:
        return clients
    step = 1 << (clients.bit_length() - 3)
    return -(-clients // step) * step


def likely_counts(clients_per_round: int, hosted: int, total: int, spread: float = 3.0) -> range:
    """Client counts a worker hosting `hosted` of `total` clients will likely get.

    Sampling `clients_per_round` without replacement gives a worker a
    hypergeometric count; this is its mean plus or minus `spread` standard
    deviations, within what is possible.
    """
    share = hosted / total
    mean = clients_per_round * share
    variance = mean * (1 - share) * (total - clients_per_round) / max(1, total - 1)
    margin = spread * math.sqrt(max(0.0, variance))
    low = max(0, math.floor(mean - margin))
    high = min(hosted, clients_per_round, math.ceil(mean + margin))
    return range(max(1, low), high + 1)


class ExecutorReuse:
    """One worker's kept executors (by client count), least recently used first."""

    def __init__(self, budget: int = EXECUTOR_BUDGET, pad: bool = True):
        self.budget = budget
        self.pad = pad
        self._kept: collections.OrderedDict[int, None] = collections.OrderedDict()

    def kept(self) -> set[int]:
        return set(self._kept)

    def target(self, clients: int) -> int:
        """The count to run `clients` clients at: the smallest kept count that
        pads at most to `padded_count`, else `padded_count` itself."""
        if not self.pad or clients == 0:
            return clients
        limit = padded_count(clients)
        return min((c for c in self._kept if clients <= c <= limit), default=limit)

    def use(self, count: int) -> list[int]:
        """Records that a call runs at `count` clients; returns the counts whose
        executors to free first so that those kept serve at most `budget`
        clients in all (never `count` itself)."""
        if count == 0:
            return []
        self._kept.pop(count, None)
        self._kept[count] = None
        evicted = []
        for kept in list(self._kept):
            if sum(self._kept) <= self.budget:
                break
            if kept != count:
                del self._kept[kept]
                evicted.append(kept)
        return evicted

    def forget(self) -> None:
        """The worker lost every executor (it restarted)."""
        self._kept.clear()

    def warm_up_counts(self, clients_per_round: int, hosted: int, total: int) -> list[int]:
        """The counts to build executors for ahead, likeliest first, within the budget."""
        likely = likely_counts(clients_per_round, hosted, total)
        counts = {padded_count(n) for n in likely} if self.pad else set(likely)
        mean = clients_per_round * hosted / total
        chosen, budget = [], self.budget
        for clients in sorted(counts, key=lambda c: (abs(c - mean), c)):
            if clients > budget:
                break
            budget -= clients
            chosen.append(clients)
        return chosen
