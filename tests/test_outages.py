"""Riding out outages (issue 24), the parts that need no worker process: the
plaintext warning said once, stopping the probes without waiting on them, the
probe back-off after a rejoin, and what a retried round is called."""

from __future__ import annotations

import logging

from coordinator.executor_client import WireStats, connection
from coordinator.rounds.timing import RoundResult, RoundTiming


def test_the_plaintext_warning_is_said_once_per_worker(caplog):
    caplog.set_level(logging.WARNING, logger="fedcompose.coordinator")
    # Every probe of a down worker opens a channel of its own.
    channels = [
        connection.open_channel(address, None, [])
        for address in ("10.250.1.2:7001", "10.250.1.2:7001", "10.250.1.3:7001", "10.250.1.2:7001")
    ]
    for channel in channels:
        channel.close()
    said = [r.getMessage() for r in caplog.records if "in plaintext" in r.getMessage()]
    assert len(said) == 2, said
    assert "10.250.1.2:7001" in said[0] and "10.250.1.3:7001" in said[1]


def _result(**fields) -> RoundResult:
    metrics = {
        "clients": 10, "examples": 400, "loss": 0.5, "accuracy": 0.8, "update_non_finite": 0,
    }  # fmt: skip
    return RoundResult(
        None, metrics, RoundTiming(), WireStats(), sampled=10, workers_total=3, **fields
    )


def test_a_round_retried_without_losing_a_partial_is_retried_not_degraded():
    from coordinator.trainer import _round_line

    retried = _result(attempts=2, failed_attempts=["3 of 10 delivered, 5 needed"]).record()
    # Degraded means partials were lost; this round's attempt lost none.
    assert retried["degraded"] == 0 and retried["retried"] == 1
    row = {"round": 4, "finished_at": 0.0, **retried}
    line = _round_line(row)
    assert "| retried: attempt 2, the earlier ones fell short" in line and "degraded" not in line

    lost = _result(lost={"worker1": "killed"}, lost_clients=["c1", "c2"]).record()
    assert lost["degraded"] == 1 and lost["retried"] == 0
    line = _round_line({"round": 5, "finished_at": 0.0, **lost})
    assert "| degraded: 2 of 10 clients lost with worker1, attempt 1" in line
    assert "retried" not in line
