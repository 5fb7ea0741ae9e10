"""The clipped client update never applies a gradient above the clip norm."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from shared import client_update, models


def _model():
    return models.model_fn_for("linear", 10)()


def _server_weights(kernel: np.ndarray | None = None) -> tff.learning.models.ModelWeights:
    kernel = np.zeros((784, 10), np.float32) if kernel is None else kernel.astype(np.float32)
    return tff.learning.models.ModelWeights(
        trainable=[tf.constant(kernel), tf.zeros([10])], non_trainable=[]
    )


def _dataset(x: np.ndarray, y: np.ndarray, batch_size: int) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(
        collections.OrderedDict(x=x.astype(np.float32), y=y.reshape(-1, 1).astype(np.int32))
    ).batch(batch_size)


def _raw_gradient_norm(model, server_weights, batch) -> float:
    weights = tff.learning.models.ModelWeights.from_model(model)
    tf.nest.map_structure(lambda v, w: v.assign(w), weights, server_weights)
    with tf.GradientTape() as tape:
        loss = model.forward_pass(batch, training=True).loss
    return float(tf.linalg.global_norm(tape.gradient(loss, weights.trainable)))


def _update_norm(output) -> float:
    return float(tf.linalg.global_norm(output.result.update))


@pytest.mark.parametrize("clip_norm", [1.0, 0.25])
def test_large_gradient_is_clipped_to_the_clip_norm(clip_norm):
    rng = np.random.default_rng(0)
    # Large inputs give a gradient norm in the thousands (zero weights keep the
    # softmax away from saturation, where Keras' loss would zero the gradient).
    x = rng.uniform(50.0, 100.0, size=(8, 784))
    y = np.full(8, 3)
    model = _model()
    server = _server_weights()
    batch = next(iter(_dataset(x, y, 8)))
    raw = _raw_gradient_norm(model, server, batch)
    assert raw > 50 * clip_norm, "the batch must really have a large gradient"

    optimizer = tff.learning.optimizers.build_sgdm(learning_rate=1.0)
    out = client_update.client_update(_model(), _dataset(x, y, 8), server, optimizer, clip_norm)
    # One step with learning rate 1: the update is exactly the applied gradient.
    assert _update_norm(out) <= clip_norm * (1 + 1e-5)
    assert _update_norm(out) == pytest.approx(clip_norm, rel=1e-4)


def test_every_step_is_clipped():
    rng = np.random.default_rng(1)
    x = rng.uniform(50.0, 100.0, size=(40, 784))
    y = rng.integers(0, 10, size=40)
    clip_norm, lr, steps = 0.5, 0.1, 5
    server = _server_weights()
    optimizer = tff.learning.optimizers.build_sgdm(learning_rate=lr)
    out = client_update.client_update(_model(), _dataset(x, y, 8), server, optimizer, clip_norm)
    # Each of the 5 steps moves the weights by at most lr * clip_norm.
    assert _update_norm(out) <= steps * lr * clip_norm * (1 + 1e-5)
    assert float(out.metrics["num_examples"]) == 40


def test_small_gradient_passes_unchanged():
    rng = np.random.default_rng(2)
    x = rng.uniform(0.0, 0.01, size=(4, 784))
    y = np.zeros(4)
    model = _model()
    server = _server_weights()
    batch = next(iter(_dataset(x, y, 4)))
    raw = _raw_gradient_norm(model, server, batch)
    assert raw < 1.0
    optimizer = tff.learning.optimizers.build_sgdm(learning_rate=1.0)
    out = client_update.client_update(_model(), _dataset(x, y, 4), server, optimizer, 1.0)
    assert _update_norm(out) == pytest.approx(raw, rel=1e-4)


def test_clip_norm_must_be_positive():
    with pytest.raises(ValueError, match="clip_norm must be > 0"):
        client_update.build_clipped_client_work(
            models.model_fn_for("linear", 10), 0.1, clip_norm=0.0
        )
