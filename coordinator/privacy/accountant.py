"""Differential privacy spent so far, for the sampling fedcompose actually does.

Each round samples `clients_per_round` of the clients uniformly without
replacement (`coordinator.federation.sample_live`) and applies the Gaussian
mechanism to the clipped client updates. The pool drawn from is every
client of the workers that are up: all clients while every worker is up,
fewer while one is down, and then every live client's chance to be drawn
rises (to 1 once clients per round reach the clients left). So the
accountant is kept round by round, each round as the event its own draw
was: `SampledWithoutReplacementDpEvent(pool, drawn, ...)`; a round's metrics
record its pool and draw, and so does the run directory's privacy ledger
(`privacy.jsonl`), from which a resumed run composes them again.

With a fixed sample size the pool size is public, so the neighbouring
relation is "replace one client" (Wang, Balle, Kasiviswanathan 2019,
Theorem 27, as `dp_accounting`'s `RdpAccountant` implements it for
`SampledWithoutReplacementDpEvent`). Replacing one client moves the sum of
clipped updates by up to twice the clip norm, while `dp_accounting`'s
Gaussian RDP for this event takes the noise over a sensitivity of one clip
norm; the noise multiplier handed to the accountant is therefore half TFF's
(noise stddev over clip norm). For `dp_adaptive` TFF's `noise_multiplier` is
already the effective one of the update and the clipped-count queries
together, so the same accounting holds.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import dp_accounting


def round_event(noise_multiplier: float, pool: int, drawn: int) -> dp_accounting.DpEvent:
    """One round as a `dp_accounting` event: `drawn` of `pool` clients, without
    replacement, under Gaussian noise of `noise_multiplier` (TFF's)."""
    import dp_accounting

    if not 0 < drawn <= pool:
        raise ValueError(f"a round draws 1..{pool} clients of {pool}, not {drawn}")
    return dp_accounting.SampledWithoutReplacementDpEvent(
        source_dataset_size=pool,
        sample_size=drawn,
        event=dp_accounting.GaussianDpEvent(noise_multiplier / 2),
    )


@functools.lru_cache(maxsize=64)
def _one_round_rdp(noise_multiplier: float, pool: int, drawn: int) -> tuple[tuple, np.ndarray]:
    """The RDP of one round at every order of the accountant.

    Computing it costs about 0.6 s (sampling without replacement has no
    closed form), so it is computed once per kind of round; rounds compose
    by adding their RDP, which is what `RdpAccountant.compose` does too
    (tests compare the two).
    """
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    accountant.compose(round_event(noise_multiplier, pool, drawn), 1)
    # dp-accounting 0.4.3 has no getter for either.
    return tuple(accountant._orders), np.asarray(accountant._rdp, dtype=np.float64)


@dataclasses.dataclass
class PrivacyAccountant:
    """The rounds run so far, each as the draw it was, and what they spent."""

    noise_multiplier: float
    delta: float
    rounds: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    """(pool, drawn) of every round so far, in order."""

    def add_round(self, pool: int, drawn: int) -> None:
        round_event(self.noise_multiplier, pool, drawn)  # checks the numbers
        self.rounds.append((pool, drawn))

    def epsilon(self) -> float:
        """Epsilon at `delta` after the rounds so far (inf without noise)."""
        if not self.rounds:
            return 0.0
        if self.noise_multiplier <= 0:
            return math.inf
        from dp_accounting import rdp

        total: np.ndarray | None = None
        for (pool, drawn), count in collections.Counter(self.rounds).items():
            orders, one_round = _one_round_rdp(self.noise_multiplier, pool, drawn)
            total = count * one_round if total is None else total + count * one_round
        epsilon, _ = rdp.compute_epsilon(orders, total, self.delta)
        return float(epsilon)

    def record(self) -> dict[str, float | int | None]:
        """What a round's metrics hold: epsilon so far (None for inf, which
        JSON lacks), delta, the last round's draw (`pool` clients, `drawn` of
        them) and how many rounds the epsilon composes (more than the round
        number once rounds were run again after a resume)."""
        eps = self.epsilon()
        out: dict[str, float | int | None] = {
            "epsilon": eps if math.isfinite(eps) else None,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
        }
        if self.rounds:
            out["pool"], out["drawn"] = self.rounds[-1]
        out["rounds_counted"] = len(self.rounds)
        return out


def describe(record: dict) -> str:
    eps = record.get("epsilon")
    return f"({'inf' if eps is None else f'{eps:.3g}'}, {record['delta']:g})-DP"
