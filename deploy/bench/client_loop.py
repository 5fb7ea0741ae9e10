"""The client loop: every sampled client's own dataset and update, in one
`tf.function`, in this process, with no TFF executor.

What the fused path (coordinator/algorithm/fused_share.py) computes on a
worker, less everything TFF adds around it: each client's dataset is the
workers' own `tf.data` pipeline built from its token (its file read, the
shuffle, per-client batches, the dataset type TFF's client work takes), its
update is fedcompose's clipped client update, and the weighted updates are
summed, `LANES` clients at a time in the fused loop's `lane_loop`. So this is
what the clients' own work costs under TFF's client-dataset contract with no
executor at all (a reference, not a lower bound: the fused call in a worker
can be faster); the Keras floor (keras_floor.py) is the same examples with
no per-client anything.

Each round is timed three times: with the plan's shuffle buffer (what
fedcompose runs, `seconds`), without a shuffle (`no_shuffle_seconds`), which
tells the shuffle's share apart, and the input alone (`input_seconds`: each
client's shuffled dataset built and iterated to its end, no training).

    python -m deploy.bench.client_loop CONFIG_JSON
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from deploy.bench import protocol as bench_protocol
from deploy.bench.plan import Plan


def _round_fn(spec, model_fn, shuffle_buffer: int):
    """`(trainable, non_trainable, tokens) -> (sum of weighted updates, examples)`."""
    import dataclasses

    import tensorflow as tf

    from coordinator.algorithm import client_work, fused_share
    from shared import preprocessing

    def dataset_fn(token: tf.Tensor) -> tf.data.Dataset:
        return preprocessing.client_dataset(
            token, "train", spec.batch_size, spec.local_epochs, shuffle_buffer
        )

    spec = dataclasses.replace(spec, shuffle_buffer=shuffle_buffer)
    make = client_work.client_step(spec, model_fn, dataset_fn)
    steps = [make() for _ in range(fused_share.LANES)]

    @tf.function
    def one_round(trainable, non_trainable, tokens):
        import tensorflow_federated as tff

        weights = tff.learning.models.ModelWeights(list(trainable), list(non_trainable))

        def client(lane, index):
            out = steps[lane](weights, tokens[index])
            weight = out.result.update_weight

            def add(acc):
                examples, *sums = acc
                summed = [a + weight * u for a, u in zip(sums, out.result.update, strict=True)]
                return [examples + weight, *summed]

            return add

        zero = [tf.constant(0.0), *(tf.zeros_like(t) for t in trainable)]
        total = fused_share.lane_loop(tf.shape(tokens)[0], zero, client)
        return total[0], total[1:]

    return one_round


def _input_fn(spec):
    """`tokens -> examples`: every client's dataset read and iterated as the
    client update iterates it (a loop over an iterator), `LANES` at a time,
    nothing else."""
    import tensorflow as tf

    from coordinator.algorithm import fused_share
    from shared import preprocessing

    @tf.function
    def read_all(tokens):
        def client(lane, index):
            dataset = preprocessing.client_dataset(
                tokens[index], "train", spec.batch_size, spec.local_epochs, spec.shuffle_buffer
            )
            examples = tf.constant(0)
            for batch in iter(dataset):
                examples += tf.shape(batch["y"])[0]
            return lambda acc: [acc[0] + examples]

        return fused_share.lane_loop(tf.shape(tokens)[0], [tf.constant(0)], client)[0]

    return read_all


def main(config_path: str) -> int:
    bench_protocol.start_child()
    import tensorflow as tf
    import tensorflow_federated as tff

    from coordinator import algorithm
    from deploy.bench.tff_local import LocalReference
    from deploy.data import shards
    from shared import models

    config = json.loads(Path(config_path).read_text())
    plan = Plan.from_json(config["plan"])
    view = shards.merged_view([Path(p) for p in config["shard_dirs"]])
    cwd = Path.cwd()
    os.chdir(view)
    try:
        for model_name in plan.models:
            spec = algorithm.AlgorithmSpec(**plan.algorithm_options(model_name))
            model_fn = models.model_fn_for(spec.model, spec.num_classes)
            weights = tff.learning.models.ModelWeights.from_model(model_fn())
            trainable = [tf.convert_to_tensor(v) for v in weights.trainable]
            non_trainable = [tf.convert_to_tensor(v) for v in weights.non_trainable]
            shuffled = _round_fn(spec, model_fn, spec.shuffle_buffer)
            unshuffled = _round_fn(spec, model_fn, 0)
            read_all = _input_fn(spec)
            for clients in plan.clients_for(model_name):
                key = bench_protocol.workload_key(model_name, clients)
                bench_protocol.emit("start", workload=key)
                for round_num in plan.round_numbers():
                    tokens = tf.constant(
                        LocalReference.tokens(
                            plan.sampled(round_num, clients), plan.seed, round_num
                        )
                    )
                    started = time.perf_counter()
                    examples, _ = shuffled(trainable, non_trainable, tokens)
                    seconds = time.perf_counter() - started
                    started = time.perf_counter()
                    unshuffled(trainable, non_trainable, tokens)
                    no_shuffle_seconds = time.perf_counter() - started
                    started = time.perf_counter()
                    read = read_all(tokens)
                    input_seconds = time.perf_counter() - started
                    if int(read) != int(examples):
                        raise RuntimeError(f"read {int(read)} examples, trained on {int(examples)}")
                    bench_protocol.emit(
                        "round",
                        workload=key,
                        round=round_num,
                        seconds=seconds,
                        no_shuffle_seconds=no_shuffle_seconds,
                        input_seconds=input_seconds,
                        examples=int(examples),
                        clients=clients,
                        ended_at=time.perf_counter(),
                    )
                bench_protocol.emit("end", workload=key)
    finally:
        os.chdir(cwd)
        shutil.rmtree(view, ignore_errors=True)
    return 0


if __name__ == "__main__":
    from shared import scratch

    scratch.private_tempdir()  # TensorFlow's autograph modules die with this process
    sys.exit(main(sys.argv[1]))
