"""TFF in one process: the reference every distributed result is measured against.

This is how TFF's tutorials run a learning process: one Python process, the
local C++ execution context, `process.next(state, client_data)` per round.
The process is fedcompose's own (`coordinator.algorithm.build`), fed the same
client tokens; the working directory is a view in which every client's file
is visible, so the dataset computations read the same files the workers do.
Tests use `LocalReference` for ground truth, the benchmark as a baseline.

    python -m deploy.bench.tff_local CONFIG_JSON     (a benchmark child)
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from deploy.bench import protocol as bench_protocol
from deploy.bench.plan import Plan


class LocalReference:
    """The composed process for `spec` in TFF's local context over `shard_dirs`.

    A context manager: it changes the working directory (to the merged view)
    and starts TFF's own executor, and undoes both on exit.
    """

    def __init__(self, shard_dirs: Sequence[Path]):
        self.shard_dirs = [Path(p).resolve() for p in shard_dirs]
        self._cwd = Path.cwd()

    def __enter__(self) -> LocalReference:
        import tensorflow_federated as tff

        from deploy.data import shards
        from shared import loopback

        # TFF's local context starts its own executor service: on loopback only too.
        loopback.confine_children()
        self._view = shards.merged_view(self.shard_dirs)
        os.chdir(self._view)
        tff.backends.native.set_sync_local_cpp_execution_context()
        return self

    def __exit__(self, *exc: object) -> None:
        import shutil

        import psutil

        os.chdir(self._cwd)
        # TFF's local context starts its own executor service and never stops it.
        for child in psutil.Process().children(recursive=True):
            try:
                child.kill()
            except psutil.Error:
                pass
        shutil.rmtree(self._view, ignore_errors=True)

    @staticmethod
    def tokens(client_ids: Sequence[str], seed: int, round_num: int) -> list[str]:
        from coordinator import federation
        from shared import preprocessing

        shuffle = federation.shuffle_seed(seed, round_num)
        return [preprocessing.make_token(c, shuffle) for c in client_ids]


def main(config_path: str) -> int:
    bench_protocol.start_child()
    from coordinator import algorithm

    config = json.loads(Path(config_path).read_text())
    plan = Plan.from_json(config["plan"])
    with LocalReference([Path(p) for p in config["shard_dirs"]]):
        for model_name in plan.models:
            spec = algorithm.AlgorithmSpec(**plan.algorithm_options(model_name))
            process = algorithm.build_process(spec)
            state = process.initialize()
            for clients in plan.clients_for(model_name):
                key = bench_protocol.workload_key(model_name, clients)
                bench_protocol.emit("start", workload=key)
                for round_num in plan.round_numbers():
                    started = time.perf_counter()
                    tokens = LocalReference.tokens(
                        plan.sampled(round_num, clients), plan.seed, round_num
                    )
                    output = process.next(state, tokens)
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
                        ended_at=time.perf_counter(),
                    )
                bench_protocol.emit("end", workload=key)
    return 0


if __name__ == "__main__":
    from shared import scratch

    scratch.private_tempdir()  # TensorFlow's autograph modules die with this process
    sys.exit(main(sys.argv[1]))
