"""Runs learning processes in TFF's own single-process local context: the ground truth.

Each run is either fedcompose's composition of its spec (`coordinator.algorithm`)
or a stock TFF builder (`tff.learning.algorithms.build_weighted_fed_avg`,
`build_unweighted_fed_avg`, `build_weighted_fed_prox`) with the optimizers and
aggregator named in the run; either way composed with fedcompose's dataset
computation (`tff.simulation.compose_dataset_computation_with_learning_process`),
so that it reads the same client files with the same preprocessing and seeds,
in `deploy.bench.tff_local.LocalReference`'s merged view of the shards.

    python tests/stock_reference.py RUNS_JSON OUT_NPZ SHARD_DIR...

RUNS_JSON is a list of {"name", "spec", "rounds", "clients_per_round", "seed",
"stock": null | {"builder": "unfused"} | {"builder": "fed_avg" | "unweighted_fed_avg" | "fed_prox",
"proximal_strength": mu, "aggregator": null | "robust" | "dp_adaptive"}}; a
stock builder gets the spec's client and server optimizers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.quiet import quiet_tensorflow  # noqa: E402

quiet_tensorflow()

import numpy as np  # noqa: E402
import tensorflow_federated as tff  # noqa: E402

from coordinator import algorithm, federation  # noqa: E402
from coordinator.algorithm import compose, finalizer, optimizers  # noqa: E402
from deploy.bench.tff_local import LocalReference  # noqa: E402
from shared import models, shard_format  # noqa: E402


def _stock_aggregator(stock: dict, spec: algorithm.AlgorithmSpec):
    name = stock.get("aggregator")
    if name is None:
        return None
    if name == "robust":
        return tff.learning.robust_aggregator(weighted=spec.blocks.weighting == "examples")
    if name == "dp_adaptive":
        return tff.learning.dp_aggregator(
            spec.blocks.noise_multiplier, float(spec.clients_per_round)
        )
    raise ValueError(name)


def stock_process(spec: algorithm.AlgorithmSpec, stock: dict):
    """A stock TFF builder's learning process; `next` takes datasets."""
    model_fn = models.model_fn_for(spec.model, spec.num_classes)
    client_optimizer = optimizers.build(
        spec.blocks.client_optimizer,
        spec.client_learning_rate,
        spec.optimizer_parameters("client"),
    )
    kwargs = {
        "client_optimizer_fn": client_optimizer,
        "server_optimizer_fn": finalizer.server_optimizer(spec),
    }
    aggregator = _stock_aggregator(stock, spec)
    if aggregator is not None:
        kwargs["model_aggregator"] = aggregator
    builder = stock["builder"]
    if builder == "fed_avg":
        return tff.learning.algorithms.build_weighted_fed_avg(model_fn, **kwargs)
    if builder == "unweighted_fed_avg":
        return tff.learning.algorithms.build_unweighted_fed_avg(model_fn, **kwargs)
    if builder == "fed_prox":
        return tff.learning.algorithms.build_weighted_fed_prox(
            model_fn, proximal_strength=float(stock["proximal_strength"]), **kwargs
        )
    raise ValueError(builder)


def main() -> None:
    runs_json, out_path, *shards = sys.argv[1:]
    runs = json.loads(runs_json)
    shard_dirs = [Path(s) for s in shards]
    client_ids = sorted(
        c.id for shard in shard_dirs for c in shard_format.read_manifest(shard).clients
    )
    out_path = str(Path(out_path).resolve())
    arrays: dict[str, np.ndarray] = {}
    with LocalReference(shard_dirs):
        for run in runs:
            spec = algorithm.AlgorithmSpec.from_dict(run["spec"])
            if run.get("stock") == {"builder": "unfused"}:
                # fedcompose's own blocks, composed with the dataset computation
                # by TFF alone (no dataset fusion): what fusion must equal.
                process = tff.simulation.compose_dataset_computation_with_learning_process(
                    compose.train_dataset_computation(spec), compose.build_learning_process(spec)
                )
            elif run.get("stock"):
                process = tff.simulation.compose_dataset_computation_with_learning_process(
                    compose.train_dataset_computation(spec), stock_process(spec, run["stock"])
                )
            else:
                process = algorithm.build_process(spec)
            state = process.initialize()
            for round_num in range(1, run["rounds"] + 1):
                ids = federation.sample_clients(
                    client_ids, round_num, run["clients_per_round"], run["seed"]
                )
                tokens = LocalReference.tokens(ids, run["seed"], round_num)
                state = process.next(state, tokens).state
            weights = process.get_model_weights(state)
            for i, w in enumerate(weights.trainable):
                arrays[f"{run['name']}__trainable_{i}"] = np.asarray(w)
    np.savez(out_path, **arrays)


if __name__ == "__main__":
    main()
