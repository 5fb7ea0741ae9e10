"""The privacy spent, as the rounds actually drew their clients, kept across resumes.

The trainer's accountant (`coordinator.privacy.spending.PrivacySpending`) against a
federation of three workers of 20 clients each and a real run directory:
rounds drawn while a worker is down, or from fewer clients than clients per
round, count as the draw they were; a resumed run composes every round its
directory recorded, including rounds run again after an earlier checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest

from coordinator.privacy.accountant import PrivacyAccountant
from coordinator.privacy.ledger import PrivacyLedger
from coordinator.privacy.spending import PrivacySpending
from coordinator.run_dir import RunDirectory
from shared.config import RunConfig

Z, DELTA = 0.8, 1e-5


@dataclasses.dataclass
class _Federation:
    """Three workers of 20 clients each."""

    per_worker: int = 20
    workers: int = 3

    @property
    def num_clients(self) -> int:
        return self.per_worker * self.workers

    def clients_of(self, worker: int) -> list[str]:
        return [f"w{worker}c{i}" for i in range(self.per_worker)]


@dataclasses.dataclass
class _Round:
    live: list[int]
    sampled: int


def _checks(run: RunDirectory, resumed_after: int, aggregator: str = "dp_fixed") -> PrivacySpending:
    config = RunConfig()
    config.algorithm.aggregator = aggregator
    config.algorithm.noise_multiplier = Z
    config.training.clients_per_round = 10
    checks = PrivacySpending(config, _Federation())
    checks.restore(run, resumed_after)
    return checks


def _expected(draws: list[tuple[int, int]]) -> float:
    accountant = PrivacyAccountant(Z, DELTA)
    for pool, drawn in draws:
        accountant.add_round(pool, drawn)
    return accountant.epsilon()


def _record(run: RunDirectory, round_num: int, spent: dict | None) -> None:
    run.metrics_jsonl.parent.mkdir(parents=True, exist_ok=True)
    with open(run.metrics_jsonl, "a") as f:
        f.write(json.dumps({"round": round_num, "privacy": spent}) + "\n")


def test_rounds_count_as_drawn_while_workers_are_down(tmp_path: Path):
    run = RunDirectory(tmp_path)
    checks = _checks(run, 0)
    rounds = [
        _Round([0, 1, 2], 10),  # every worker up: 10 of 60
        _Round([0, 2], 10),  # a worker down: 10 of its 40 live clients
        _Round([1], 10),  # two down, and 10 of the 20 left
    ]
    rows = [checks.spend(i, r) for i, r in enumerate(rounds, start=1)]
    assert [(r["pool"], r["drawn"]) for r in rows] == [(60, 10), (40, 10), (20, 10)]
    assert rows[-1]["epsilon"] == pytest.approx(_expected([(60, 10), (40, 10), (20, 10)]))
    # Before, every round was taken as 10 of all 60: too little privacy spent.
    assert rows[-1]["epsilon"] > _expected([(60, 10)] * 3) * 1.05
    # Clients per round beyond the live clients: every live client is drawn.
    (tmp_path / "small").mkdir()
    checks = _checks(RunDirectory(tmp_path / "small"), 0)
    assert checks.spend(1, _Round([2], 20))["epsilon"] == pytest.approx(_expected([(20, 20)]))


def test_a_resumed_run_counts_every_recorded_round_and_reruns_again(tmp_path: Path, caplog):
    run = RunDirectory(tmp_path)
    first = _checks(run, 0)
    draws = [([0, 1, 2], 10), ([0, 1], 10), ([0, 1, 2], 10), ([0, 1, 2], 10)]
    for i, (live, sampled) in enumerate(draws, start=1):
        _record(run, i, first.spend(i, _Round(live, sampled)))
    assert [e["round"] for e in PrivacyLedger(run.privacy_jsonl).entries()] == [1, 2, 3, 4]

    # The run stopped; its newest checkpoint is after round 2 (rounds 3 and 4
    # were recorded, then cut from metrics.jsonl): they stay spent.
    run.truncate_metrics_after(2)
    with caplog.at_level(logging.WARNING, logger="fedcompose.coordinator"):
        resumed = _checks(run, 2)
    assert "round(s) 3, 4 were recorded after the checkpoint" in caplog.text
    spent = [(60, 10), (40, 10), (60, 10), (60, 10)]
    assert resumed.privacy()["epsilon"] == pytest.approx(_expected(spent))
    row = resumed.spend(3, _Round([0, 1, 2], 10))
    assert row["epsilon"] == pytest.approx(_expected([*spent, (60, 10)]))
    assert row["rounds_counted"] == 5
    assert [e["round"] for e in PrivacyLedger(run.privacy_jsonl).entries()] == [
        1,
        2,
        3,
        4,
        3,
    ]  # as run

    # A line a crash cut short is dropped on resume, and appends start afresh.
    with open(run.privacy_jsonl, "a") as f:
        f.write('{"round": 4, "po')
    again = _checks(run, 2)
    again.spend(4, _Round([0, 1, 2], 10))
    assert [e["round"] for e in PrivacyLedger(run.privacy_jsonl).entries()] == [1, 2, 3, 4, 3, 4]


def test_a_directory_without_a_ledger_is_rebuilt_from_its_rows(tmp_path: Path, caplog):
    run = RunDirectory(tmp_path)
    _record(run, 1, {"epsilon": 1.0, "delta": DELTA, "pool": 40, "drawn": 10})
    _record(run, 2, {"epsilon": 2.0, "delta": DELTA})  # says nothing of its draw
    with caplog.at_level(logging.WARNING, logger="fedcompose.coordinator"):
        checks = _checks(run, 3)  # and round 3 has no row at all
    assert "2 earlier round(s) were drawn from (rounds 2, 3)" in caplog.text
    assert checks.privacy()["epsilon"] == pytest.approx(_expected([(40, 10), (60, 10), (60, 10)]))
    assert [e["round"] for e in PrivacyLedger(run.privacy_jsonl).entries()] == [1, 2, 3]


def test_no_ledger_without_a_dp_aggregator(tmp_path: Path):
    run = RunDirectory(tmp_path)
    checks = _checks(run, 0, aggregator="mean")
    assert checks.spend(1, _Round([0, 1, 2], 10)) is None and checks.privacy() is None
    assert not run.privacy_jsonl.exists()


@pytest.mark.slow
def test_a_dp_run_that_loses_a_worker_and_resumes_counts_every_draw(workers3, tmp_path):
    """Real workers: one is killed in round 2 (round 3 is drawn from the two
    left), the coordinator is killed in round 4 with its newest checkpoint
    after round 2, the worker comes back and the run resumes: round 3 is run
    again, and the epsilon composes all seven rounds as they were drawn."""
    import os
    import signal

    from tests.conftest import fedcompose, kill_tree
    from tests.fault_tools import wait_recorded
    from tests.test_worker_failures import _paused, _restart, _rows, _train

    run_dir = tmp_path / "run"
    kill_at, coordinator_at = tmp_path / "kill", tmp_path / "coordinator"
    args = ("--rounds", "6", "--eval-every", "3", "--checkpoint-every", "2")
    args += ("--aggregator", "dp_fixed", "--noise-multiplier", str(Z))
    proc = _train(
        workers3, run_dir, *args, pauses={"dispatch:2": kill_at, "dispatch:4": coordinator_at}
    )
    try:
        sent_to = _paused(kill_at, proc)["workers"]
        victim = next(w for w in workers3 if w.address in sent_to)
        os.killpg(victim.process.pid, signal.SIGKILL)
        kill_at.unlink()
        _paused(coordinator_at, proc)
        wait_recorded(run_dir, 3, 2, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        kill_tree(proc)
    before = _rows(run_dir)
    assert [r["round"] for r in before] == [1, 2, 3]
    assert len(before[2]["live_workers"]) == 2
    down_pool = before[2]["privacy"]["pool"]
    assert 0 < down_pool < 60 and before[0]["privacy"]["pool"] == 60

    _restart(victim)
    resumed = fedcompose(
        "train", "--addresses", ",".join(w.address for w in workers3), "--run-dir",
        str(run_dir), *args, check=True,
    )  # fmt: skip
    assert "round(s) 3 were recorded after the checkpoint" in resumed.stderr
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == list(range(1, 7))
    ledger = PrivacyLedger(RunDirectory(run_dir).privacy_jsonl).entries()
    assert [e["round"] for e in ledger] == [1, 2, 3, 3, 4, 5, 6]
    draws = [(e["pool"], e["drawn"]) for e in ledger]
    assert draws == [(60, 10), (60, 10), (down_pool, 10)] + [(60, 10)] * 4
    final = json.loads((run_dir / "status.json").read_text())["privacy"]
    assert final["rounds_counted"] == 7 and rows[-1]["privacy"] == final
    assert final["epsilon"] == pytest.approx(_expected(draws), rel=1e-9)
    assert final["epsilon"] > _expected([(60, 10)] * 6) * 1.05
