"""The coordinator refuses a federation that is not one task, before round 1."""

from __future__ import annotations

import numpy as np
import pytest

from deploy import workers as workers_lib
from deploy.data import shards as shards_lib
from deploy.data.sources import ClientData, FederatedSource
from tests.conftest import fedcompose


def _tiny_source(dataset: str, num_classes: int, prefix: str) -> FederatedSource:
    rng = np.random.default_rng(0)
    clients = [
        ClientData(
            id=f"{prefix}{i}",
            train_pixels=rng.random((6, 28, 28), dtype=np.float32),
            train_labels=rng.integers(0, num_classes, 6).astype(np.int32),
            test_pixels=rng.random((2, 28, 28), dtype=np.float32),
            test_labels=rng.integers(0, num_classes, 2).astype(np.int32),
        )
        for i in range(4)
    ]
    return FederatedSource(dataset=dataset, num_classes=num_classes, clients=clients)


def _train_against(shard_dirs, tmp_path):
    started = workers_lib.start_workers(shard_dirs, tmp_path / "logs", check="quick")
    try:
        return fedcompose(
            "train",
            "--addresses",
            ",".join(w.address for w in started),
            "--rounds",
            "2",
            "--clients-per-round",
            "2",
            "--run-dir",
            str(tmp_path / "run"),
            timeout=300,
        )
    finally:
        workers_lib.stop_workers(started)


@pytest.mark.slow
def test_client_hosted_twice_is_refused(shards2, tmp_path):
    result = _train_against([shards2[0], shards2[0]], tmp_path)
    assert result.returncode == 4
    assert (
        "is hosted twice" in result.stderr
        and "each client must live on exactly one worker" in result.stderr
    )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_workers_with_different_tasks_are_refused(shards2, tmp_path):
    other = _tiny_source("emnist-all", 62, "other_")
    shards_lib.write_shards(other, [[0, 1, 2, 3]], tmp_path / "other", {"scheme": "natural"})
    result = _train_against([shards2[0], shards_lib.shard_dir(tmp_path / "other", 0)], tmp_path)
    assert result.returncode == 4
    assert "workers serve different tasks" in result.stderr
    assert (
        "sklearn-digits (10 classes)" in result.stderr
        and "emnist-all (62 classes)" in result.stderr
    )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_too_many_clients_per_round_is_refused(workers2, tmp_path):
    result = fedcompose(
        "train",
        "--addresses",
        ",".join(w.address for w in workers2),
        "--clients-per-round",
        "61",
        "--run-dir",
        str(tmp_path / "run"),
        timeout=300,
    )
    assert result.returncode == 2
    assert "--clients-per-round 61 is more than the 60 clients the workers host" in result.stderr
