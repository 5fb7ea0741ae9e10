"""Which executors a worker keeps, and at which client count a round runs.

TFF's executor service builds a new executor (TensorFlow sessions for every
computation) for each number of clients it is sent, which costs tens to
hundreds of milliseconds; sampling gives a worker a different number almost
every round. So a worker's clients are padded with empty clients up to one
of a few counts (at most a quarter more), the executors for those counts are
kept for reuse within a budget (least recently used go first), and the first
round with a new number of clients per round builds, ahead, the executors for
the counts sampling will likely give each worker.

Policy, no gRPC: `RoundExecutor` asks it what to run at, and it tells the
worker's client (anything with `dispose_executor`) what to free.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Sequence
from typing import Protocol

from shared.errors import UsageError

EXECUTOR_BUDGET = 256
"""Clients a worker's kept executors may serve in all: each keeps a session per
loaded computation. (Memory is not what bounds them: a worker's memory follows
the clients of its largest call, see `MemoryPlan`. Measured on a CNN worker:
after a call of 64 clients at 1,204 MB, keeping that executor and adding one
for 32 clients left it at 1,290 MB, and disposing of both freed nothing the
next call did not reuse.)"""

BASE_MB = 500.0
"""A whole worker (its Python process, about 55 MB, and its executor service
with the model loaded and a first call run): the budget bounds both."""
CLIENT_MB = {"linear": 0.25, "cnn": 16.5}
"""Memory a client holds while its call runs (its model copy, optimizer,
gradients, batches), by model. Measured on one worker, `worker_binary` RSS
against clients per call (linear 16 to 1,024: 93 -> 297 MB; CNN 8 to 128:
385 -> 2,230 MB), and the whole worker's peak in `fedcompose bench --curves
memory` (CNN calls of 50 and 91 clients: 1,332 and 2,010 MB, i.e. about
505 MB + 16.5 MB per client)."""
EVAL_CLIENT_MB = 0.25
"""Memory an evaluated client holds while its call runs: TFF's evaluation keeps
no model state per client (measured: 3,400 CNN writers in one call, worker
peak 308 MB; in calls of 80, 296 MB), so it is bounded like a linear client."""
MODEL_MB = {"linear": 0.03, "cnn": 4.8}
"""The model's weights; optimizers with slots (Adam, Yogi, Adagrad) hold more per client."""
OPTIMIZER_SLOTS = {"adam": 2, "yogi": 2, "adagrad": 1, "sgdm": 1}
USER_CLIENT_FACTOR = CLIENT_MB["cnn"] / MODEL_MB["cnn"] + 2
"""Memory per client of a user's model, in multiples of its weights (the CNN's
measured ratio, plus an optimizer with two slots: the user's is unknown)."""


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """How many clients a worker runs in one call, from its memory budget.

    Every client of a call is held at once by the executor service, so a
    worker's memory is about `BASE_MB + clients_per_call * client_mb`. A
    worker's share of a round (or of an evaluation) larger than
    `clients_per_call` runs as several calls, one after another, whose partial
    aggregates the worker merges itself (`mergeable`): the coordinator still
    sees one partial per worker.
    """

    budget_mb: int
    client_mb: float
    clients_per_call: int | None
    """None: no budget, a worker's whole share in one call."""
    eval_clients_per_call: int | None = None
    """The same for evaluation, which holds far less per client (`EVAL_CLIENT_MB`)."""

    @classmethod
    def of(cls, budget_mb: int, model: str, client_optimizer: str = "sgd") -> MemoryPlan:
        client_mb = CLIENT_MB.get(model, CLIENT_MB["cnn"]) + OPTIMIZER_SLOTS.get(
            client_optimizer, 0
        ) * MODEL_MB.get(model, MODEL_MB["cnn"])
        return cls._fitting(budget_mb, client_mb, f"{model} client ({client_optimizer} optimizer)")

    @classmethod
    def for_model_size(cls, budget_mb: int, model_mb: float) -> MemoryPlan:
        """A plan for a user's model, known only by the size of its weights:
        the built-in CNN holds about 3.4 times its weights per client, and an
        optimizer with two slots two times more."""
        client_mb = max(CLIENT_MB["linear"], USER_CLIENT_FACTOR * model_mb)
        return cls._fitting(budget_mb, client_mb, f"client of this {model_mb:.2f} MB model")

    @classmethod
    def _fitting(cls, budget_mb: int, client_mb: float, what: str) -> MemoryPlan:
        if budget_mb <= 0:
            return cls(budget_mb, client_mb, None)
        if budget_mb < BASE_MB + client_mb:
            raise UsageError(
                f"--worker-memory-mb {budget_mb} is less than a worker running one {what} "
                f"needs: about {BASE_MB + client_mb:.0f} "
                f"MB; use at least {math.ceil(BASE_MB + client_mb)} (or 0: no budget)"
            )
        fitting = int((budget_mb - BASE_MB) // client_mb)
        eval_fitting = int((budget_mb - BASE_MB) // EVAL_CLIENT_MB)
        return cls(
            budget_mb,
            client_mb,
            largest_padded_count(fitting),
            largest_padded_count(eval_fitting),
        )

    def describe(self) -> str:
        if self.clients_per_call is None:
            return "no worker memory budget: a worker's share in one call"
        return (
            f"worker memory budget {self.budget_mb} MB: at most {self.clients_per_call} clients "
            f"per call (about {self.client_mb:g} MB each)"
        )


def largest_padded_count(limit: int) -> int:
    """The largest count `padded_count` can give that is at most `limit`."""
    if limit <= 8:
        return max(1, limit)
    # The counts of `limit`'s power of two are the multiples of its step.
    step = 1 << (limit.bit_length() - 3)
    return limit // step * step


def piece_sizes(clients: int, per_call: int | None) -> list[int]:
    """A share of `clients` as calls of at most `per_call`, as equal as can be."""
    if clients <= 0:
        return []
    if per_call is None or clients <= per_call:
        return [clients]
    pieces = -(-clients // per_call)
    size, extra = divmod(clients, pieces)
    return [size + 1] * extra + [size] * (pieces - extra)


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


class Executors(Protocol):
    """What the policy frees executors on: a worker's client."""

    def dispose_executor(self, num_clients: int) -> None: ...


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

    def make_room(self, worker: Executors, counts: Sequence[int]) -> None:
        """Records the calls of a worker's share, at `counts` in call order, and
        frees on `worker` the executors evicted to make room for them. The
        first call's count (the share's main one) is recorded last, so it is
        the last of them to be evicted later."""
        for count in dict.fromkeys(reversed(counts)):
            for evicted in self.use(count):
                worker.dispose_executor(evicted)

    def pieces(self, clients: int, per_call: int | None) -> list[tuple[int, int]]:
        """A share of `clients` as calls: (real clients, count run at) each.

        Padded, every piece runs at one count (at most `per_call`): the
        largest piece's target, so one executor serves them all. Unpadded,
        pieces differ by at most one client.
        """
        sizes = piece_sizes(clients, per_call)
        if not self.pad or not sizes:
            return [(n, n) for n in sizes]
        count = self.target(sizes[0])
        if per_call is not None and count > per_call:
            count = sizes[0]
        return [(n, count) for n in sizes]

    def forget(self) -> None:
        """The worker lost every executor (it restarted)."""
        self._kept.clear()

    def warm_up_counts(
        self, clients_per_round: int, hosted: int, total: int, per_call: int | None = None
    ) -> list[int]:
        """The counts to build executors for ahead, likeliest first, within the budget."""
        likely = likely_counts(clients_per_round, hosted, total)
        counts = {count for n in likely for _, count in self.pieces(n, per_call)}
        mean = clients_per_round * hosted / total
        if per_call is not None:
            mean = min(mean, per_call)
        chosen, budget = [], self.budget
        for clients in sorted(counts, key=lambda c: (abs(c - mean), c)):
            if clients > budget:
                break
            budget -= clients
            chosen.append(clients)
        return chosen
