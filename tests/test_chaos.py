"""`fedcompose bench --chaos` runs a short soak end to end and checks itself.

A smoke test of the command, not a timed test: the soak's own checks (every
round recorded once, checkpoints complete, no temporary file, no process
left, none outliving the SIGKILLed coordinator) must hold, and its report
must hold the figures docs/failures.md quotes.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import fedcompose

pytestmark = pytest.mark.slow


def test_short_chaos_soak_finishes_and_loses_nothing(tmp_path):
    work = tmp_path / "chaos"
    result = fedcompose(
        "bench", "--chaos", "--rounds", "40", "--chaos-every", "4", "--run-dir", str(work),
        # A deadline with room for a loaded 2-core machine: the soak stops
        # workers for multiples of it, so it stays as hard, only slower.
        "--round-timeout", "6",
        timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    report = json.loads((work / "chaos.json").read_text())
    assert report["rounds_recorded_once_in_order"] and report["state"] == "finished"
    assert report["checkpoints"][-1] == 40 and report["checkpoints_ok"]
    assert report["orphans"] == [] and report["leftover_temporaries"] == []
    assert report["coordinator_kill"] is not None, "the soak never killed its coordinator"
    assert report["coordinator_kill"]["orphans_after_it"] == 0
    # Two faults are always made (a fault waits until two workers serve, and two
    # do until a killed one is back); a third needs a killed worker back before
    # the quiet tail, which the round speed decides (fused linear rounds of
    # ~60 ms finish the 40 rounds before a worker's restart).
    assert sum(report["faults"].values()) >= 2, report["fault_log"]
    for key in ("rounds_degraded", "clients_lost", "rounds_with_a_worker_down"):
        assert report[key] >= 0
    assert "chaos soak: 40 rounds" in result.stdout and "time to recover" in result.stdout
    # The share of rounds each worker served, as the rounds recorded say.
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    served = report["workers_served"]
    assert sorted(served) == ["worker0", "worker1", "worker2"]
    for label, figures in served.items():
        expected = sum(label in r["workers"] and label not in r["workers_lost"] for r in rows)
        assert figures["rounds_served"] == expected and figures["share_served"] == round(
            expected / 40, 3
        )
        assert f"{label} {expected}/40 (" in result.stdout
    assert "rounds each worker served (up in): worker0 " in result.stdout
