"""Baseline: the same composed process in TFF's single-process local context.

This is how TFF's tutorials run a learning process: one Python process, the
local C++ execution context, `process.next(state, client_data)` per round.
The process is fedcompose's own (`coordinator.algorithm.build`), fed the same
client tokens; the working directory is a view in which every client's file
is visible, so the dataset computation reads the same files the workers do.

    python -m deploy.bench_tff_local CONFIG_JSON
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from deploy import bench_protocol
from deploy.bench_plan import Plan


def _kill_children() -> None:
    # TFF's local context starts its own executor service and never stops it.
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass


def main(config_path: str) -> int:
    bench_protocol.start_child()
    import tensorflow_federated as tff

    from coordinator import algorithm
    from deploy import shards
    from shared import preprocessing

    config = json.loads(Path(config_path).read_text())
    plan = Plan.from_json(config["plan"])
    view = shards.merged_view([Path(p) for p in config["shard_dirs"]])
    os.chdir(view)
    tff.backends.native.set_sync_local_cpp_execution_context()
    try:
        for model_name in plan.models:
            alg = algorithm.build(algorithm.AlgorithmSpec(**plan.algorithm_options(model_name)))
            state = alg.process.initialize()
            for clients in plan.clients_for(model_name):
                key = bench_protocol.workload_key(model_name, clients)
                bench_protocol.emit("start", workload=key)
                for round_num in plan.round_numbers():
                    started = time.perf_counter()
                    tokens = [
                        preprocessing.make_token(c, plan.shuffle_seed(round_num))
                        for c in plan.sampled(round_num, clients)
                    ]
                    output = alg.process.next(state, tokens)
                    seconds = time.perf_counter() - started
                    state = output.state
                    train = output.metrics["client_work"]["train"]
                    bench_protocol.emit(
                        "round",
                        workload=key,
                        round=round_num,
                        seconds=seconds,
                        examples=int(train["num_examples"]),
                        clients=clients,
                        loss=float(train["loss"]),
                    )
                bench_protocol.emit("end", workload=key)
    finally:
        _kill_children()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
