"""Runs algorithms over real worker processes, several in one coordinator process.

The distributed side of the block tests: like `fedcompose train` (the same
`FederationSession` and `RoundExecutor`), but several algorithms against the
same workers in one process, with padding set per run, and the final weights
of each written to one .npz file.

    python tests/distributed_run.py ADDRESSES RUNS_JSON OUT_NPZ

RUNS_JSON is a list of {"name", "spec" (AlgorithmSpec.from_dict), "rounds",
"clients_per_round", "seed", "pad": "auto" | "off" | "forced"}; "forced" pads
even an aggregator that counts clients (a control showing that it matters).
Optional: "fused" (false: a worker's share of a round as calls per client, the
path before fusing), "clients_per_call" (a worker's share runs as calls of at most that
many clients, merged on the worker, as a memory budget makes it), "evaluate"
(the final model's held-out figures go into the report).
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
from coordinator.rounds import prepared  # noqa: E402
from coordinator.rounds.executor_reuse import ExecutorReuse, MemoryPlan  # noqa: E402
from coordinator.rounds.round_executor import RoundExecutor  # noqa: E402
from coordinator.session import FederationSession  # noqa: E402


def main() -> None:
    addresses, runs_json, out_path = sys.argv[1:]
    runs = json.loads(runs_json)
    arrays: dict[str, np.ndarray] = {}
    report: dict[str, dict] = {}
    with FederationSession(addresses.split(","), rpc_timeout=300, connect_timeout=60) as session:
        assert session.federation is not None and session.server is not None
        built: dict[str, prepared.PreparedAlgorithm] = {}
        for run in runs:
            key = json.dumps(run["spec"], sort_keys=True)
            if key not in built:  # the same algorithm, run with and without padding
                built[key] = prepared.prepare(algorithm.AlgorithmSpec.from_dict(run["spec"]))
            executor = RoundExecutor(
                built[key],
                session.federation,
                session.server,
                pad_clients=run.get("pad", "auto") != "off",
                fused=run.get("fused", True),
            )
            if run.get("pad") == "forced":
                executor.reuse = [
                    ExecutorReuse(executor.reuse[0].budget, True) for _ in executor.reuse
                ]
            if run.get("clients_per_call"):
                per_call = run["clients_per_call"]
                executor.memory = MemoryPlan(0, 0.0, per_call, eval_clients_per_call=per_call)
            try:
                state = executor.initialize()
                padded = pieces = 0
                for round_num in range(1, run["rounds"] + 1):
                    sampled = session.federation.sample(
                        round_num, run["clients_per_round"], run["seed"]
                    )
                    result = executor.train_round(
                        state, sampled, federation.shuffle_seed(run["seed"], round_num)
                    )
                    state = result.state
                    padded += sum(
                        w.padded_to - w.clients for w in result.timing.per_worker.values()
                    )
                    pieces = max([pieces, *(w.pieces for w in result.timing.per_worker.values())])
                weights = executor.model_weights(state)
                evaluation = executor.evaluate(state) if run.get("evaluate") else None
            finally:
                executor.close()
            for i, w in enumerate(weights.trainable):
                arrays[f"{run['name']}__trainable_{i}"] = np.asarray(w)
            report[run["name"]] = {
                "padded_clients": padded,
                "most_pieces": pieces,
                "metrics": _plain(result.metrics),
                "evaluation": evaluation,
            }
    np.savez(out_path, **arrays)
    Path(out_path).with_suffix(".json").write_text(json.dumps(report))


def _plain(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | dict | type(None))}


if __name__ == "__main__":
    main()
