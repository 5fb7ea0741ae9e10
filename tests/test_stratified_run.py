"""Stratified sampling in real runs: each worker gets its proportional share
every round, the choice is recorded, and the distributed run still equals
TFF's single process drawing the same clients."""

from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest

ATOL = 1e-5


def _max_diff(a, b) -> float:
    return max(
        float(np.abs(np.asarray(x) - np.asarray(y)).max())
        for x, y in zip(a.trainable, b.trainable, strict=True)
    )


@pytest.mark.slow
def test_stratified_rounds_give_proportional_shares_and_equal_tff(tmp_path):
    import fedcompose
    from tests.user_algorithms import tutorial

    spec = tutorial.preprocess(fedcompose.empty_client_dataset()).element_spec
    model_fn = tutorial.model_fn_for(spec)
    process = tutorial.compose(model_fn)
    rounds, clients = 3, 9
    with fedcompose.LocalFederation(workers=2, progress=False) as federation:
        result = federation.train(
            process,
            preprocess=tutorial.preprocess,
            model_fn=model_fn,
            rounds=rounds,
            clients_per_round=clients,
            seed=4,
            sampling="stratified",
            run_dir=tmp_path / "run",
        )
        stratified = federation.run_in_tff(
            process,
            preprocess=tutorial.preprocess,
            rounds=rounds,
            clients_per_round=clients,
            seed=4,
            sampling="stratified",
        )
        uniform = federation.run_in_tff(
            process,
            preprocess=tutorial.preprocess,
            rounds=rounds,
            clients_per_round=clients,
            seed=4,
        )

    diff = _max_diff(result.model_weights, stratified.model_weights)
    print(f"stratified: max |distributed - TFF single process| {diff:.2e}")
    assert diff <= ATOL
    # The same seed under uniform sampling draws other clients: the comparison
    # above is not one that any sampling would pass.
    assert _max_diff(stratified.model_weights, uniform.model_weights) > 1e-4

    run_dir = tmp_path / "run"
    trained_on = json.loads((run_dir / "trained_on.json").read_text())
    assert trained_on["sampling"] == "stratified"
    config = tomllib.loads((run_dir / "config.toml").read_text())
    assert config["training"]["sampling"] == "stratified"
    hosted = [trained_on["clients_per_shard"][str(i)] for i in range(2)]
    for record in result.records:
        shares = [record["workers"][f"worker{i}"]["clients"] for i in range(2)]
        # Each share is its proportional share rounded down or up.
        assert sum(shares) == clients, record
        assert all(
            abs(s - clients * h / sum(hosted)) < 1 for s, h in zip(shares, hosted, strict=True)
        ), (record, hosted)
