"""Differential privacy spent so far, for the sampling fedcompose actually does.

Each round samples `clients_per_round` of the `population` clients uniformly
without replacement (`coordinator.federation.sample_clients`) and applies the
Gaussian mechanism to the clipped client updates. With a fixed sample size
the population size is public, so the neighbouring relation is "replace one
client" (Wang, Balle, Kasiviswanathan 2019, Theorem 27, as `dp_accounting`'s
`RdpAccountant` implements it for `SampledWithoutReplacementDpEvent`).
Replacing one client moves the sum of clipped updates by up to twice the clip
norm, while `dp_accounting`'s Gaussian RDP for this event takes the noise
over a sensitivity of one clip norm; the noise multiplier handed to the
accountant is therefore half TFF's (noise stddev over clip norm). For
`dp_adaptive` TFF's `noise_multiplier` is already the effective one of the
update and the clipped-count queries together, so the same accounting holds.

While workers are down, a round samples only the clients of the live workers
(`coordinator.federation.sample_live`): a live client's chance to be drawn
rises from k/N to k/N_live, so such a round is accounted as the event of
sampling its clients from N_live (every client that stays live through it
spends that much; a client on a down worker spends nothing).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class PrivacyAccountant:
    noise_multiplier: float
    clients_per_round: int
    population: int
    delta: float

    def __post_init__(self) -> None:
        if not 0 < self.clients_per_round <= self.population:
            raise ValueError(
                f"clients_per_round {self.clients_per_round} must be in 1..{self.population}"
            )

    def round_event(self, sampling: tuple[int, int] | None = None):
        """One round as a `dp_accounting` event: `clients_per_round` of the
        `population`, or `sampling` (population, sample) for a round that drew
        from the clients of the live workers only."""
        import dp_accounting

        population, sample = sampling or (self.population, self.clients_per_round)
        return dp_accounting.SampledWithoutReplacementDpEvent(
            source_dataset_size=population,
            sample_size=sample,
            event=dp_accounting.GaussianDpEvent(self.noise_multiplier / 2),
        )

    @functools.lru_cache(maxsize=64)  # noqa: B019 (frozen and long-lived: one per run)
    def _one_round_rdp(self, sampling: tuple[int, int] | None = None):
        """The RDP of one round at every order of the accountant.

        Computing it costs about 0.6 s (sampling without replacement has no
        closed form), so it is computed once per sampling; `rounds` rounds
        compose to `rounds` times it, which is what
        `RdpAccountant.compose(event, rounds)` computes too (tests compare the two).
        """
        import dp_accounting
        from dp_accounting import rdp

        accountant = rdp.RdpAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
        )
        accountant.compose(self.round_event(sampling), 1)
        return accountant._orders, accountant._rdp  # dp-accounting 0.4.3 has no getter

    def epsilon(self, rounds: int, reduced: Mapping[tuple[int, int], int] | None = None) -> float:
        """Epsilon at `delta` after `rounds` rounds (inf without noise).

        `reduced`: how many of those rounds sampled (population, sample)
        other than (`population`, `clients_per_round`), because workers were down.
        """
        if rounds <= 0:
            return 0.0
        if self.noise_multiplier <= 0:
            return math.inf
        from dp_accounting import rdp

        reduced = reduced or {}
        orders, one_round = self._one_round_rdp()
        total = (rounds - sum(reduced.values())) * one_round
        for sampling, count in reduced.items():
            total = total + count * self._one_round_rdp(sampling)[1]
        epsilon, _ = rdp.compute_epsilon(orders, total, self.delta)
        return float(epsilon)

    def record(
        self, rounds: int, reduced: Mapping[tuple[int, int], int] | None = None
    ) -> dict[str, float | None]:
        """What a round's metrics hold: epsilon (None for inf, which JSON lacks) and delta."""
        eps = self.epsilon(rounds, reduced)
        return {
            "epsilon": eps if math.isfinite(eps) else None,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
        }


def describe(record: dict) -> str:
    eps = record.get("epsilon")
    return f"({'inf' if eps is None else f'{eps:.3g}'}, {record['delta']:g})-DP"
