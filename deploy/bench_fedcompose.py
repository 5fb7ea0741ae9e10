"""fedcompose's coordinator under measurement, against running workers.

Runs what `fedcompose train` runs (server executor, federation, composed
process, `RoundExecutor`) for every workload of the plan, and reports each
round's time split and bytes on the wire. The workers are started and
measured by the benchmark itself.

    python -m deploy.bench_fedcompose CONFIG_JSON
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from deploy import bench_protocol
from deploy.bench_plan import Plan


def _round_event(key: str, round_num: int, sample_seconds: float, result) -> dict:
    timing = result.timing
    per_worker = {
        label: {
            "clients": t.clients,
            "seconds": t.seconds,
            "compute": t.compute,
            "upload": t.upload,
            "setup": t.setup,
            "new_executor": t.new_executor,
        }
        for label, t in sorted(timing.per_worker.items())
    }
    # Sampling happens outside `train_round`; it is coordinator work too.
    total = timing.total + sample_seconds
    server = result.wire_by_peer.get("server")
    return {
        "workload": key,
        "round": round_num,
        "seconds": total,
        "examples": result.metrics["examples"],
        "clients": result.metrics["clients"],
        "loss": result.metrics["loss"],
        "sample": sample_seconds,
        "prepare": timing.prepare,
        "first_partial": timing.first_partial,
        "workers_wall": timing.workers_wall,
        "merge": timing.merge,
        "finalize": timing.finalize,
        "worker_compute": timing.worker_compute,
        "warm_up": timing.warm_up,
        "coordinator": timing.coordinator + sample_seconds,
        "waiting": timing.waiting,
        "overhead": max(0.0, total - timing.warm_up - timing.worker_compute),
        "new_executors": sum(1 for w in per_worker.values() if w["new_executor"]),
        "per_worker": per_worker,
        "bytes_sent": result.wire.bytes_sent,
        "bytes_received": result.wire.bytes_received,
        "server_bytes_sent": server.bytes_sent if server else None,
        "server_bytes_received": server.bytes_received if server else None,
    }


def _model_bytes(weights) -> int:
    import numpy as np

    return int(sum(np.asarray(w).nbytes for w in weights.trainable))


def main(config_path: str) -> int:
    bench_protocol.start_child()
    from coordinator import algorithm, federation, rounds
    from coordinator.server import ServerExecutor

    config = json.loads(Path(config_path).read_text())
    plan = Plan.from_json(config["plan"])
    server = ServerExecutor.start(
        rpc_timeout=plan.rpc_timeout, log_path=Path(config["log_dir"]) / "server-executor.log"
    )
    fed = None
    try:
        server.install_as_default_context()
        fed = federation.connect(
            config["addresses"], rpc_timeout=plan.rpc_timeout, connect_timeout=120.0
        )
        if tuple(fed.client_ids) != plan.client_ids:
            raise RuntimeError("the workers do not host the clients of the benchmark's plan")
        for model_name in plan.models:
            alg = algorithm.build(algorithm.AlgorithmSpec(**plan.algorithm_options(model_name)))
            executor = rounds.RoundExecutor(alg, fed, server)
            try:
                state = executor.initialize()
                bench_protocol.emit(
                    "model",
                    model=model_name,
                    model_bytes=_model_bytes(executor.model_weights(state)),
                )
                for clients in plan.clients_for(model_name):
                    key = bench_protocol.workload_key(model_name, clients)
                    bench_protocol.emit("start", workload=key)
                    for round_num in plan.round_numbers():
                        started = time.perf_counter()
                        sampled = fed.sample(round_num, clients, plan.seed)
                        sample_seconds = time.perf_counter() - started
                        result = executor.train_round(state, sampled, plan.shuffle_seed(round_num))
                        state = result.state
                        bench_protocol.emit(
                            "round", **_round_event(key, round_num, sample_seconds, result)
                        )
                    bench_protocol.emit("end", workload=key)
            finally:
                executor.close()
    finally:
        if fed is not None:
            fed.close()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
