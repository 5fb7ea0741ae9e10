"""Runs the composed process in TFF's own single-process local context.

The ground truth for distributed runs: `deploy.bench.tff_local.LocalReference`
(the benchmark's TFF baseline), on the same clients and seeds. Run as a
subprocess, so that TFF's global context stays out of the test process.

    python tests/reference_run.py SPEC_JSON OUT_NPZ SHARD_DIR...
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

from coordinator import algorithm, federation  # noqa: E402
from deploy.bench.tff_local import LocalReference  # noqa: E402
from shared import shard_format  # noqa: E402


def main() -> None:
    spec_json, out_path, *shards = sys.argv[1:]
    options = json.loads(spec_json)
    rounds, clients_per_round, seed = (
        options.pop("rounds"),
        options.pop("clients_per_round"),
        options.pop("seed"),
    )
    clients_by_round = options.pop("clients_by_round", None)
    shard_dirs = [Path(s) for s in shards]
    client_ids = sorted(
        c.id for shard in shard_dirs for c in shard_format.read_manifest(shard).clients
    )
    out_path = str(Path(out_path).resolve())
    with LocalReference(shard_dirs):
        process = algorithm.build_process(algorithm.AlgorithmSpec(**options))
        state = process.initialize()
        initial = process.get_model_weights(state)
        for round_num in range(1, rounds + 1):
            ids = federation.sample_clients(client_ids, round_num, clients_per_round, seed)
            if clients_by_round is not None:  # a run with failures: the clients that made it
                ids = clients_by_round[round_num - 1]
            state = process.next(state, LocalReference.tokens(ids, seed, round_num)).state
        weights = process.get_model_weights(state)
    arrays = {f"trainable_{i}": np.asarray(w) for i, w in enumerate(weights.trainable)}
    arrays.update({f"initial_{i}": np.asarray(w) for i, w in enumerate(initial.trainable)})
    np.savez(out_path, **arrays)


if __name__ == "__main__":
    main()
