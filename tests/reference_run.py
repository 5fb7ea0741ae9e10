"""Runs the composed process in TFF's own single-process local context.

Used by tests as the ground truth for distributed runs: the same composed
process, the same clients and seeds, executed the way TFF's tutorial does,
with every shard's files visible to one local executor. Run as a subprocess,
so that TFF's global context and this working directory stay out of the test.

    python tests/reference_run.py SPEC_JSON OUT_NPZ SHARD_DIR...
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shared.quiet import quiet_tensorflow  # noqa: E402

quiet_tensorflow()

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import tensorflow_federated as tff  # noqa: E402

from coordinator import algorithm, federation, trainer  # noqa: E402
from deploy.shards import merged_view  # noqa: E402
from shared import preprocessing, shard_format  # noqa: E402


def main() -> None:
    spec_json, out_path, *shards = sys.argv[1:]
    options = json.loads(spec_json)
    rounds, clients_per_round, seed = (
        options.pop("rounds"),
        options.pop("clients_per_round"),
        options.pop("seed"),
    )
    shard_dirs = [Path(s) for s in shards]
    view = merged_view(shard_dirs)
    client_ids = sorted(
        c.id for shard in shard_dirs for c in shard_format.read_manifest(shard).clients
    )
    os.chdir(view)
    alg = algorithm.build(algorithm.AlgorithmSpec(**options))
    tff.backends.native.set_sync_local_cpp_execution_context()
    try:
        state = alg.process.initialize()
        initial = alg.process.get_model_weights(state)
        for round_num in range(1, rounds + 1):
            ids = federation.sample_clients(client_ids, round_num, clients_per_round, seed)
            tokens = [
                preprocessing.make_token(c, trainer.shuffle_seed(seed, round_num)) for c in ids
            ]
            state = alg.process.next(state, tokens).state
        weights = alg.process.get_model_weights(state)
        arrays = {f"trainable_{i}": np.asarray(w) for i, w in enumerate(weights.trainable)}
        arrays.update({f"initial_{i}": np.asarray(w) for i, w in enumerate(initial.trainable)})
        np.savez(out_path, **arrays)
    finally:
        # TFF's local context starts its own executor and does not stop it.
        for child in psutil.Process().children(recursive=True):
            child.kill()


if __name__ == "__main__":
    main()
