"""Riding out outages (issue 24), the parts that need no worker process: the
plaintext warning said once, stopping the probes without waiting on them, the
probe back-off after a rejoin, and what a retried round is called."""

from __future__ import annotations

import logging
import threading
import time

from coordinator.executor_client import WireStats, connection
from coordinator.federation import WorkerDescription
from coordinator.liveness import Liveness
from coordinator.rounds.timing import RoundResult, RoundTiming
from shared import shard_format, worker_dir
from shared.errors import FederationError


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


def _description(index: int) -> WorkerDescription:
    manifest = shard_format.Manifest(
        task=shard_format.Task("sklearn-digits", 10),
        build_id="b1",
        shard_index=index,
        num_shards=3,
        partition={},
        clients=(shard_format.ClientEntry(f"c{index}", 5, 1, "x", "y"),),
    )
    return WorkerDescription(f"10.250.0.{index}:7000", manifest, worker_dir.WorkerInfo(pid=1))


def test_stopping_does_not_wait_on_probes_stuck_in_a_partition():
    # Across a partition a probe takes its whole deadline. Waiting 2 s for
    # each probe thread in turn held a run that gave up for 6 s (3 workers).
    entered, release = threading.Semaphore(0), threading.Event()

    def probe(index: int) -> WorkerDescription:
        entered.release()
        release.wait(60)
        raise FederationError("unreachable")

    live = Liveness([_description(i) for i in range(3)], probe, probe_interval=0.01)
    try:
        for i in range(3):
            live.mark_down(i, "partitioned")
        for _ in range(3):
            assert entered.acquire(timeout=30)
        started = time.monotonic()
        live.stop()
        # 0.5 s of grace in all; a loaded machine may add a little, never 1.5 s more.
        assert time.monotonic() - started < 2.0
    finally:
        release.set()
        live.stop()


def test_a_probe_that_succeeds_resets_the_back_off_of_a_flapping_worker():
    # Each outage soon after a rejoin doubled the first probe's wait, for good:
    # after three of them a worker that served again was probed 8x later.
    base = 0.02
    waits: list[float] = []

    def probe(index: int) -> WorkerDescription:
        waits.append(live.health(index).next_probe_in)
        return _description(index)

    live = Liveness([_description(i) for i in range(2)], probe, probe_interval=base)
    try:
        for _ in range(5):
            live.mark_down(1, "killed")  # right after rejoining: a flap
            deadline = time.monotonic() + 30
            while not live.take_rejoining():
                assert time.monotonic() < deadline, "never answered"
                live.wait_for_change(0.05)
            live.mark_up(1)
        assert len(waits) == 5 and max(waits) <= 2 * base, waits
    finally:
        live.stop()
