"""fedcompose's coordinator under measurement, against running workers.

Runs what `fedcompose train` runs (server executor, federation, composed
process, `RoundExecutor`) for every workload of the plan, and reports each
round's time split and bytes on the wire. The workers are started and
measured by the benchmark itself.

Each round is recorded as `fedcompose train` records it (a run directory
per workload under `records_dir`: metrics, TensorBoard, a checkpoint every
round, status, all by the record writer), so that `ended_at`, the moment the
next round may start, measures the gap between round ends a user sees.

    python -m deploy.bench.fedcompose_child CONFIG_JSON
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from deploy.bench import protocol as bench_protocol
from deploy.bench.plan import Plan
from shared.config import UNIFORM


def _round_event(key: str, round_num: int, sample_seconds: float, result) -> dict:
    """A round's record, flattened for the report, with sampling counted as
    coordinator work (it happens outside `train_round`)."""
    record = result.record()
    timing, wire = record["timing"], record["wire"]
    total = record["round_seconds"] + sample_seconds
    return {
        "workload": key,
        "round": round_num,
        "seconds": total,
        "examples": record["examples"],
        "clients": record["clients"],
        "loss": record["train"]["loss"],
        "sample": sample_seconds,
        **timing,
        "coordinator": timing["coordinator"] + sample_seconds,
        "overhead": max(0.0, total - timing["warm_up"] - timing["worker_compute"]),
        "new_executors": sum(1 for w in record["workers"].values() if w["new_executor"]),
        "per_worker": record["workers"],
        "bytes_sent": wire["bytes_sent"],
        "bytes_received": wire["bytes_received"],
        "server_bytes_sent": wire["server_bytes_sent"],
        "server_bytes_received": wire["server_bytes_received"],
    }


def _model_bytes(weights) -> int:
    import numpy as np

    return int(sum(np.asarray(w).nbytes for w in weights.trainable))


def _records(config: dict, key: str):
    """A fresh run directory for a workload's records."""
    from coordinator.run_dir import RunDirectory

    path = Path(config["records_dir"]) / key.replace("/", "-")
    path.mkdir(parents=True, exist_ok=True)
    return RunDirectory(path)


def main(config_path: str) -> int:
    bench_protocol.start_child()
    from coordinator import algorithm
    from coordinator.executor_client.connection import load_client_tls
    from coordinator.record_writer import RecordWriter
    from coordinator.run_dir import state_leaves
    from coordinator.session import FederationSession

    config = json.loads(Path(config_path).read_text())
    plan = Plan.from_json(config["plan"])
    with FederationSession(
        config["addresses"],
        rpc_timeout=plan.rpc_timeout,
        connect_timeout=120.0,
        log_dir=Path(config["log_dir"]),
        tls=load_client_tls(config.get("tls_dir", "")),
    ) as session:
        fed = session.federation
        assert fed is not None
        if tuple(fed.client_ids) != plan.client_ids:
            raise RuntimeError("the workers do not host the clients of the benchmark's plan")
        for model_name in plan.models:
            executor = session.round_executor(
                algorithm.AlgorithmSpec(**plan.algorithm_options(model_name)),
                plan.worker_memory_mb,
                fused=config.get("fused", True),
            )
            state = executor.initialize()
            bench_protocol.emit(
                "model", model=model_name, model_bytes=_model_bytes(executor.model_weights(state))
            )
            for clients in plan.clients_for(model_name):
                key = bench_protocol.workload_key(model_name, clients)
                run = _records(config, key)
                writer = RecordWriter(run, checkpoint_round=0)
                bench_protocol.emit("start", workload=key)
                try:
                    for round_num in plan.round_numbers():
                        started = time.perf_counter()
                        sampled = fed.sample(
                            round_num,
                            clients,
                            plan.seed,
                            sampling=config.get("sampling", UNIFORM),
                        )
                        sample_seconds = time.perf_counter() - started
                        result = executor.train_round(state, sampled, plan.shuffle_seed(round_num))
                        state = result.state
                        # What the trainer does at a round's end (trainer._loop).
                        row = {"round": round_num + 1, "finished_at": round(time.time(), 3)}
                        writer.round_done({**row, **result.record()}, state_leaves(state))
                        event = _round_event(key, round_num, sample_seconds, result)
                        bench_protocol.emit("round", **event, ended_at=time.perf_counter())
                    writer.close()
                finally:
                    writer.abandon()
                bench_protocol.emit("end", workload=key)
    return 0


if __name__ == "__main__":
    from shared import scratch

    scratch.private_tempdir()  # TensorFlow's autograph modules die with this process
    sys.exit(main(sys.argv[1]))
