"""A worker's share larger than its memory budget runs as several calls that
the worker merges itself, with the same result as one call.

The policy (how many clients per call, how a share is cut) is pure and tested
without gRPC; the equality is tested over real worker processes.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from coordinator.rounds import executor_reuse
from coordinator.rounds.executor_reuse import (
    ExecutorReuse,
    MemoryPlan,
    largest_padded_count,
    padded_count,
    piece_sizes,
)
from shared.errors import UsageError
from tests.conftest import ROOT


def test_clients_per_call_follow_the_budget_and_the_model():
    cnn = MemoryPlan.of(2048, "cnn")
    assert cnn.clients_per_call is not None
    # The plan stays within the budget by its own figures (whole worker + clients).
    assert executor_reuse.BASE_MB + cnn.clients_per_call * cnn.client_mb <= 2048
    # Evaluation holds far less per client: more of them per call, still bounded.
    assert cnn.eval_clients_per_call is not None
    assert cnn.eval_clients_per_call > cnn.clients_per_call
    # A budget below one client's need is refused, per model and optimizer.
    with pytest.raises(UsageError, match="at least 517"):
        MemoryPlan.of(512, "cnn")
    with pytest.raises(UsageError, match="adam"):
        MemoryPlan.of(520, "cnn", "adam")
    # A huge budget is planned at once (no loop over every count that fits).
    assert MemoryPlan.of(10**12, "linear").clients_per_call > 10**12
    assert MemoryPlan.of(4096, "cnn").clients_per_call > cnn.clients_per_call
    # Optimizer slots cost memory per client: Adam fits fewer than SGD.
    assert MemoryPlan.of(2048, "cnn", "adam").clients_per_call < cnn.clients_per_call
    assert MemoryPlan.of(2048, "linear").clients_per_call > 1000
    assert MemoryPlan.of(0, "cnn").clients_per_call is None
    # Counts are ones padding lands on, so pieces reuse one executor.
    for plan in (cnn, MemoryPlan.of(2048, "linear")):
        assert padded_count(plan.clients_per_call) == plan.clients_per_call


@pytest.mark.parametrize("limit", [1, 7, 9, 100, 109, 1000])
def test_largest_padded_count_is_at_most_the_limit(limit):
    count = largest_padded_count(limit)
    assert count <= limit and padded_count(count) == count
    assert all(padded_count(c) != c for c in range(count + 1, limit + 1))


@pytest.mark.parametrize(
    ("clients", "per_call", "sizes"),
    [
        (10, None, [10]),
        (10, 10, [10]),
        (11, 10, [6, 5]),
        (150, 64, [50, 50, 50]),
        (151, 64, [51, 50, 50]),
        (0, 8, []),
    ],
)
def test_a_share_is_cut_into_equal_calls(clients, per_call, sizes):
    assert piece_sizes(clients, per_call) == sizes


def test_padded_pieces_run_at_one_count_within_the_budget():
    pieces = ExecutorReuse(pad=True).pieces(151, 64)
    assert [real for real, _ in pieces] == [51, 50, 50]
    counts = {count for _, count in pieces}
    assert len(counts) == 1 and 51 <= counts.pop() <= 64
    unpadded = ExecutorReuse(pad=False).pieces(151, 64)
    assert unpadded == [(51, 51), (50, 50), (50, 50)]


@pytest.mark.slow
def test_pieces_merged_on_the_worker_equal_one_call(workers2, tmp_path):
    """Training (padded and, for a client-counting aggregator, unpadded pieces
    of different sizes) and evaluation split into calls of at most 5 clients
    give the weights and held-out figures of unsplit calls."""
    runs = []
    for weighting in ("examples", "uniform"):
        spec = {"model": "linear", "blocks": {"weighting": weighting}}
        for per_call in (None, 5):
            runs.append(
                {
                    "name": f"{weighting}-{per_call}",
                    "spec": spec,
                    "rounds": 3,
                    "clients_per_round": 24,
                    "seed": 3,
                    "clients_per_call": per_call,
                    "evaluate": True,
                }
            )
    out = tmp_path / "runs.npz"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "distributed_run.py"),
            ",".join(w.address for w in workers2),
            json.dumps(runs),
            str(out),
        ],
        check=True,
        timeout=900,
        capture_output=True,
    )
    weights = np.load(out)
    report = json.loads(out.with_suffix(".json").read_text())
    for weighting in ("examples", "uniform"):
        whole, split = f"{weighting}-None", f"{weighting}-5"
        assert report[whole]["most_pieces"] == 1
        assert report[split]["most_pieces"] >= 3, report[split]
        for i in (0, 1):
            np.testing.assert_allclose(
                weights[f"{split}__trainable_{i}"],
                weights[f"{whole}__trainable_{i}"],
                atol=1e-5,
                rtol=0,
            )
        a, b = report[whole]["evaluation"], report[split]["evaluation"]
        # Evaluation was split too (30 writers per worker in calls of 5), not only training.
        assert a["calls_per_worker"] == 1 and b["calls_per_worker"] >= 6, (a, b)
        assert a["examples"] == b["examples"] == 360
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["accuracy"] - b["accuracy"]) < 1e-6
