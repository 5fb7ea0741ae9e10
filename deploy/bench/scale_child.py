"""The coordinator at scale, under measurement: a benchmark child.

Against running workers that host many clients, it times what grows with
them: discovery (reading every worker's manifest through a computation),
sampling, rounds at each number of clients per round, an evaluation of every
hosted writer and a checkpoint, and reports each as a JSON event (see
`protocol`). The benchmark samples this process's memory (and its server
executor's) meanwhile.

    python -m deploy.bench.scale_child CONFIG_JSON
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from deploy.bench import protocol as bench_protocol


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def main(config_path: str) -> int:
    bench_protocol.start_child()
    import asyncio

    import tensorflow_federated as tff

    from coordinator import algorithm, federation
    from coordinator.session import FederationSession

    config = json.loads(Path(config_path).read_text())
    hosted = config["hosted"]
    bench_protocol.emit("start", workload=f"scale/{hosted}", phase="discovery")
    started = time.perf_counter()
    with FederationSession(
        config["addresses"],
        rpc_timeout=config["rpc_timeout"],
        connect_timeout=120.0,
        log_dir=Path(config["log_dir"]),
    ) as session:
        fed = session.federation
        assert fed is not None
        discovery = time.perf_counter() - started
        bench_protocol.emit(
            "step",
            step="discovery",
            seconds=discovery,
            clients=fed.num_clients,
            rss_mb=_rss_mb(),
        )
        executor = session.round_executor(
            algorithm.AlgorithmSpec(model=config["model"]), config["worker_memory_mb"]
        )
        state = executor.initialize()
        for clients in config["clients_per_round"]:
            for round_num in (1, 2):  # the first builds executors
                t0 = time.perf_counter()
                sampled = fed.sample(round_num, clients, 0)
                sample_seconds = time.perf_counter() - t0
                result = executor.train_round(state, sampled, federation.shuffle_seed(0, round_num))
                state = result.state
                bench_protocol.emit(
                    "step",
                    step=f"round/{clients}",
                    round=round_num,
                    seconds=time.perf_counter() - t0,
                    sample_seconds=sample_seconds,
                    pieces=max(w.pieces for w in result.timing.per_worker.values()),
                    rss_mb=_rss_mb(),
                )
        t0 = time.perf_counter()
        evaluation = executor.evaluate(state)
        assert evaluation is not None
        bench_protocol.emit(
            "step",
            step="evaluation",
            seconds=time.perf_counter() - t0,
            clients=evaluation["clients"],
            examples=evaluation["examples"],
            accuracy=evaluation["accuracy"],
            pieces=evaluation["calls_per_worker"],
            rss_mb=_rss_mb(),
        )
        with tempfile.TemporaryDirectory(prefix="fedcompose-bench-ckpt-") as tmp:
            manager = tff.program.FileProgramStateManager(tmp, prefix="round_")
            t0 = time.perf_counter()
            asyncio.run(manager.save(state, 1))
            bench_protocol.emit("step", step="checkpoint", seconds=time.perf_counter() - t0)
        executor.close()
    bench_protocol.emit("end", workload=f"scale/{hosted}")
    return 0


if __name__ == "__main__":
    from shared import scratch

    scratch.private_tempdir()  # TensorFlow's autograph modules die with this process
    sys.exit(main(sys.argv[1]))
