"""Your own data through the Python API: shards of a non-EMNIST structure
(8x8x3 uint8 images, int64 labels, a variable-length field the model ignores)
built with `fedcompose.build_shards`, served by two real workers, a user's
model trained on them; the loss falls and the weights equal TFF's
single-process run of the same process on the same shards within 1e-5."""

from __future__ import annotations

import collections

import numpy as np
import pytest

ATOL = 1e-5
CLASSES = 3


def generated_clients(seed: int, num_clients: int, per_client: int) -> dict:
    """Images whose mean colour channel says the label, plus noise: learnable."""
    rng = np.random.default_rng(seed)
    clients = {}
    for i in range(num_clients):
        labels = rng.integers(0, CLASSES, per_client)
        images = rng.integers(0, 120, (per_client, 8, 8, 3))
        images[np.arange(per_client), :, :, labels] += 120
        clients[f"user-{i:02d}"] = collections.OrderedDict(
            image=images.astype(np.uint8),
            label=labels.astype(np.int64),
            tags=[np.arange(rng.integers(0, 4)) for _ in range(per_client)],
        )
    return clients


def preprocess(dataset):
    import tensorflow as tf

    def to_batch(e):
        x = tf.reshape(tf.cast(e["image"], tf.float32) / 255.0, [-1, 192])
        return collections.OrderedDict(x=x, y=tf.reshape(e["label"], [-1, 1]))

    # The variable-length tags would not batch; this model does not use them.
    pixels_and_labels = dataset.map(lambda e: {"image": e["image"], "label": e["label"]})
    return pixels_and_labels.batch(8).map(to_batch)


def model_fn_for(spec):
    import tensorflow as tf
    import tensorflow_federated as tff

    def model_fn():
        keras_model = tf.keras.Sequential(
            [
                tf.keras.layers.Input(shape=(192,)),
                tf.keras.layers.Dense(
                    CLASSES, kernel_initializer=tf.keras.initializers.GlorotUniform(seed=1)
                ),
            ]
        )
        return tff.learning.models.from_keras_model(
            keras_model,
            input_spec=spec,
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[tf.keras.metrics.SparseCategoricalAccuracy()],
        )

    return model_fn


@pytest.mark.slow
def test_own_data_trains_across_workers_and_equals_tff(tmp_path):
    import tensorflow as tf
    import tensorflow_federated as tff

    import fedcompose

    fedcompose.build_shards(
        generated_clients(0, 8, 24),
        tmp_path / "shards",
        workers=2,
        test=generated_clients(1, 8, 8),
        label_key="label",
        dataset="coloured-squares",
    )
    with fedcompose.LocalFederation(shards_dir=tmp_path / "shards", progress=False) as federation:
        raw = federation.raw_element_spec()
        assert raw["image"] == tf.TensorSpec([8, 8, 3], tf.uint8)
        assert raw["tags"] == tf.TensorSpec([None], tf.int64)
        spec = preprocess(federation.empty_client_dataset()).element_spec
        model_fn = model_fn_for(spec)
        process = tff.learning.algorithms.build_weighted_fed_avg(
            model_fn,
            client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=0.5),
        )
        result = federation.train(
            process,
            preprocess=preprocess,
            model_fn=model_fn,
            rounds=3,
            clients_per_round=4,
            seed=2,
            eval_every=1,
            run_dir=tmp_path / "run",
        )
        reference = federation.run_in_tff(
            process, preprocess=preprocess, rounds=3, clients_per_round=4, seed=2
        )
    history = result.history
    assert history["eval_loss"].iloc[-1] < history["eval_loss"].iloc[0]
    diff = max(
        float(np.abs(np.asarray(a) - np.asarray(b)).max())
        for a, b in zip(
            result.model_weights.trainable, reference.model_weights.trainable, strict=True
        )
    )
    print(
        f"max |distributed - TFF single process| {diff:.2e}; eval loss {list(history['eval_loss'])}"
    )
    assert diff <= ATOL
    # Nothing of the data in the run directory.
    assert not list(result.run_dir.rglob("*.tensors"))
