"""Compute floor: plain Keras training over the union of a round's clients.

For each round of the plan, the examples of all sampled clients are put in
memory, preprocessed as the workers do, batched with the same batch size and
trained on for `local_epochs` passes, twice: with `model.fit`, and with
Keras' own train step compiled once as a loop over the whole dataset (no
per-call Python, but a slower start on small data). The faster of the two is
the round's floor. Nothing federated happens: this is how fast the same model
learns from the same examples on this machine, the floor that any federated
runtime's round time is measured against.

Each round also times the compiled loop once more over the same examples
batched client by client (`client_batches_seconds`), as federated training
batches them: each client's last batch is partial, so there are more, smaller
batches (`client_batches` against `batches`). What that costs is federated
learning's own, not any runtime's.

    python -m deploy.bench.keras_floor CONFIG_JSON
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from deploy.bench import protocol as bench_protocol
from deploy.bench.plan import Plan


def _train_pass_fn(model):
    import tensorflow as tf

    # Keras' own train step inside one tf.function over the whole dataset:
    # `model.fit` adds tens of milliseconds of Python per call (callbacks, data
    # adapters), a large part of a round of a few thousand examples.
    @tf.function
    def train_pass(dataset):
        for batch in dataset:
            model.train_step(batch)

    return train_pass


def _client_batches(shard_dirs, clients, batch_size: int):
    """The clients' examples batched client by client, in client order, cached."""
    import tensorflow as tf

    from deploy.data import synthetic as bench_data
    from shared import preprocessing, shard_format

    xs, ys = [], []
    for pixels, labels in bench_data.client_arrays(shard_dirs, clients):
        for batch in preprocessing.batches_from_arrays(pixels, labels, batch_size):
            xs.append(batch["x"].numpy())
            ys.append(batch["y"].numpy())

    def batches():
        yield from zip(xs, ys, strict=True)

    spec = (
        tf.TensorSpec([None, shard_format.PIXELS], tf.float32),
        tf.TensorSpec([None, 1], tf.int32),
    )
    dataset = tf.data.Dataset.from_generator(batches, output_signature=spec).cache()
    for _ in dataset:
        pass
    return dataset, len(xs)


def main(config_path: str) -> int:
    bench_protocol.start_child()
    import tensorflow as tf

    from deploy.data import synthetic as bench_data
    from shared import models, preprocessing

    config = json.loads(Path(config_path).read_text())
    plan = Plan.from_json(config["plan"])
    shard_dirs = [Path(p) for p in config["shard_dirs"]]
    for model_name in plan.models:
        model = models.keras_model(model_name, 10)
        model.compile(
            optimizer=tf.keras.optimizers.SGD(learning_rate=plan.client_learning_rate),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(),
        )
        train_pass = _train_pass_fn(model)
        for clients in plan.clients_for(model_name):
            key = bench_protocol.workload_key(model_name, clients)
            bench_protocol.emit("start", workload=key)
            for round_num in plan.round_numbers():
                pixels, labels = bench_data.read_clients(
                    shard_dirs, plan.sampled(round_num, clients)
                )
                batches = preprocessing.batches_from_arrays(pixels, labels, plan.batch_size)
                dataset = batches.map(lambda b: (b["x"], b["y"])).cache()
                # Materialize the batches first: the floor is training, not input.
                for _ in dataset:
                    pass
                started = time.perf_counter()
                model.fit(dataset, epochs=plan.local_epochs, verbose=0, shuffle=False)
                fit_seconds = time.perf_counter() - started
                started = time.perf_counter()
                for _ in range(plan.local_epochs):
                    train_pass(dataset)
                loop_seconds = time.perf_counter() - started
                by_client, client_batches = _client_batches(
                    shard_dirs, plan.sampled(round_num, clients), plan.batch_size
                )
                started = time.perf_counter()
                for _ in range(plan.local_epochs):
                    train_pass(by_client)
                client_batches_seconds = time.perf_counter() - started
                bench_protocol.emit(
                    "round",
                    workload=key,
                    round=round_num,
                    seconds=min(fit_seconds, loop_seconds),
                    fit_seconds=fit_seconds,
                    loop_seconds=loop_seconds,
                    client_batches_seconds=client_batches_seconds,
                    batches=-(-len(labels) // plan.batch_size),
                    client_batches=client_batches,
                    examples=len(labels) * plan.local_epochs,
                    clients=clients,
                    ended_at=time.perf_counter(),
                )
            bench_protocol.emit("end", workload=key)
    return 0


if __name__ == "__main__":
    from shared import scratch

    scratch.private_tempdir()  # TensorFlow's autograph modules die with this process
    sys.exit(main(sys.argv[1]))
