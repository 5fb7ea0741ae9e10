"""A run over real worker processes equals TFF's single-process execution."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, fedcompose


@pytest.mark.slow
def test_three_rounds_over_two_workers_match_tff_local_context(workers2, shards2, tmp_path):
    run_dir = tmp_path / "run"
    addresses = ",".join(w.address for w in workers2)
    fedcompose(
        "train",
        "--addresses",
        addresses,
        "--rounds",
        "3",
        "--clients-per-round",
        "24",
        "--eval-every",
        "0",
        "--run-dir",
        str(run_dir),
        check=True,
    )
    distributed = np.load(run_dir / "final_model.npz")

    spec = {
        "model": "linear",
        "num_classes": 10,
        "client_learning_rate": 0.3,
        "server_learning_rate": 1.0,
        "clip_norm": 1.0,
        "batch_size": 20,
        "local_epochs": 1,
        "shuffle_buffer": 100,
        "rounds": 3,
        "clients_per_round": 24,
        "seed": 0,
    }
    reference_path = tmp_path / "reference.npz"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "reference_run.py"),
            json.dumps(spec),
            str(reference_path),
            *map(str, shards2),
        ],
        check=True,
        timeout=600,
        capture_output=True,
    )
    reference = np.load(reference_path)

    for i in (0, 1):
        np.testing.assert_allclose(
            distributed[f"trainable_{i}"], reference[f"trainable_{i}"], atol=1e-5, rtol=0
        )
    # Training really moved the weights, so the comparison means something.
    assert np.abs(reference["trainable_0"] - reference["initial_0"]).max() > 1e-2
    # Both clients' shards took part: the run sampled across the two workers.
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert all(len(r["workers"]) == 2 for r in rows)
    # Each worker's share ran as one fused TensorFlow call (coordinator/algorithm/
    # fused_share.py), said once in the log, at one client count: never padded.
    # Padding (the unfused path's) is matched with TFF in tests/test_blocks_match_tff.py.
    log = (run_dir / "logs" / "coordinator.log").read_text()
    assert log.count("one TensorFlow call per worker per round (fused share)") == 1
    assert all(w["padded_to"] == w["clients"] for r in rows for w in r["workers"].values())
