"""The privacy a run spends, round by round as its clients were drawn, kept
across resumes in the run directory's ledger."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from coordinator.privacy.accountant import PrivacyAccountant
from coordinator.privacy.ledger import PrivacyLedger
from coordinator.run_dir.metrics_repair import rounds_text
from shared.config import RunConfig

if TYPE_CHECKING:
    from coordinator.run_dir import RunDirectory

log = logging.getLogger("fedcompose.coordinator")


class _Clients(Protocol):
    """What the spending needs of the federation: who can be drawn."""

    @property
    def num_clients(self) -> int: ...

    def clients_of(self, worker: int) -> list[str]: ...


class _Draw(Protocol):
    """What the spending needs of a round: which workers were up, how many drawn."""

    live: list[int]
    sampled: int


class PrivacySpending:
    """The accountant of a run with a DP aggregator, and its ledger; without
    one, nothing is spent and every method is a no-op."""

    def __init__(self, config: RunConfig, federation: _Clients):
        a = config.algorithm
        self.federation = federation
        self.clients_per_round = config.training.clients_per_round
        self.accountant = (
            PrivacyAccountant(a.noise_multiplier, a.dp_delta)
            if a.aggregator.startswith("dp_")
            else None
        )
        self._ledger: PrivacyLedger | None = None
        """Where each round is recorded (`restore`)."""

    def restore(self, run: RunDirectory, rounds: int) -> None:
        """The accountant, for a run whose checkpoint is after round `rounds`:
        every DP round its directory recorded (`privacy.jsonl`), including
        rounds recorded after that checkpoint, which are run again and count
        twice. Rounds up to `rounds` that the ledger lacks (a directory from
        before it) come from their metrics rows, or, where those do not say,
        are taken as drawn from every client; the log says so. From here on,
        each recorded round is added to the ledger (`spend`)."""
        if self.accountant is None:
            return
        self._ledger = PrivacyLedger(run.privacy_jsonl)
        ledger = [
            e
            for e in self._ledger.entries()
            if type(e.get("round")) is int and _draw(e) is not None
        ]
        ledger_rounds = {e["round"] for e in ledger}
        from_rows = {r.get("round"): _draw(r.get("privacy")) for r in run.metrics()}
        everyone = self.federation.num_clients
        assumed, earlier = [], []
        for round_num in range(1, rounds + 1):
            if round_num in ledger_rounds:
                continue
            draw = from_rows.get(round_num)
            if draw is None:
                assumed.append(round_num)
                draw = (everyone, min(self.clients_per_round, everyone))
            earlier.append(self._entry(round_num, *draw))
        # In the order run: rounds from before the ledger existed came first.
        entries = earlier + ledger
        if assumed:
            log.warning(
                "privacy: the run directory does not say which clients %d earlier round(s) "
                "were drawn from (rounds %s); counted as drawn from all %d clients",
                len(assumed),
                rounds_text(assumed),
                everyone,
            )
        again = sorted({e["round"] for e in entries if e["round"] > rounds})
        if again:
            log.warning(
                "privacy: round(s) %s were recorded after the checkpoint this run resumes "
                "from; their privacy cost stays spent, and running them again spends it again",
                rounds_text(again),
            )
        for entry in entries:
            # Every entry has a valid draw: the ledger's were kept for it, the others made so.
            self.accountant.add_round(entry["pool"], entry["drawn"])
        self._ledger.write(entries)

    def _entry(self, round_num: int, pool: int, drawn: int) -> dict:
        assert self.accountant is not None
        return {
            "round": round_num,
            "pool": pool,
            "drawn": drawn,
            "noise_multiplier": self.accountant.noise_multiplier,
        }

    def spend(self, round_num: int, result: _Draw) -> dict | None:
        """Adds a round about to be recorded to the accountant (and to the
        ledger first, so no recorded round is ever missing from it), as its
        clients were drawn: `sampled` of the clients of the workers that were
        up (`result.live`). Returns what its metrics row holds, with a DP
        aggregator."""
        if self.accountant is None:
            return None
        pool = sum(len(self.federation.clients_of(w)) for w in result.live)
        drawn = result.sampled
        if self._ledger is not None:
            self._ledger.append(self._entry(round_num, pool, drawn))
        self.accountant.add_round(pool, drawn)
        return self.accountant.record()

    def privacy(self) -> dict | None:
        """(epsilon, delta) spent so far, with a DP aggregator."""
        return self.accountant.record() if self.accountant else None


def recorded(status: dict) -> dict | None:
    """The (epsilon, delta) status.json recorded, if it holds them whole."""
    spent = status.get("privacy")
    if (
        isinstance(spent, dict)
        and isinstance(spent.get("delta"), int | float)
        and (spent.get("epsilon") is None or isinstance(spent.get("epsilon"), int | float))
    ):
        return spent
    return None


def _draw(record: object) -> tuple[int, int] | None:
    """(pool, drawn) of a ledger entry or a metrics row's `privacy`, if it says."""
    if not isinstance(record, dict):
        return None
    pool, drawn = record.get("pool"), record.get("drawn")
    if type(pool) is int and type(drawn) is int and 0 < drawn <= pool:
        return pool, drawn
    return None
