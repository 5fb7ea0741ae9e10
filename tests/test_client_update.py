"""The client update: non-finite clients are zeroed and counted, FedProx pulls
towards the server model, optimizers and the unclipped variant plug in."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from shared import client_update
from tests.test_clipping import _dataset, _model, _server_weights


def _data(n: int = 40, nan: bool = False):
    rng = np.random.default_rng(1)
    x = rng.uniform(0.0, 1.0, size=(n, 784))
    if nan:
        x[3, 100] = np.nan
    return x, rng.integers(0, 10, n)


def _run(x, y, clip_norm=1.0, mu=0.0, optimizer=None, server=None):
    optimizer = optimizer or tff.learning.optimizers.build_sgdm(learning_rate=0.5)
    server = server or _server_weights(np.random.default_rng(2).normal(size=(784, 10)) * 0.05)
    return client_update.client_update(
        _model(), _dataset(x, y, 10), server, optimizer, clip_norm, mu
    )


def test_a_nan_in_the_data_zeroes_the_update_and_counts_the_client():
    out = _run(*_data(nan=True))
    assert all(np.all(np.asarray(u) == 0) for u in out.result.update)
    assert float(out.result.update_weight) == 0.0
    m = {k: float(v) for k, v in out.metrics.items()}
    assert m == {
        "loss_sum": 0.0,
        "correct": 0.0,
        "num_examples": 0.0,
        "dropped_clients": 1.0,
        "dropped_examples": 40.0,
    }


def test_a_diverging_learning_rate_is_caught_the_same_way():
    optimizer = tff.learning.optimizers.build_sgdm(learning_rate=3e38)
    out = _run(*_data(), clip_norm=None, optimizer=optimizer)
    assert float(out.metrics["dropped_clients"]) == 1.0
    assert float(out.result.update_weight) == 0.0


def test_a_finite_client_is_reported_as_before():
    out = _run(*_data())
    assert float(out.metrics["dropped_clients"]) == 0.0
    assert float(out.result.update_weight) == 40.0 == float(out.metrics["num_examples"])
    assert np.isfinite(float(out.metrics["loss_sum"])) and float(out.metrics["loss_sum"]) > 0
    assert any(np.abs(np.asarray(u)).max() > 0 for u in out.result.update)


def test_the_proximal_term_pulls_the_client_towards_the_server_model():
    x, y = _data(200)
    sgd = tff.learning.optimizers.build_sgdm(learning_rate=0.1)
    norms = [
        float(tf.linalg.global_norm(_run(x, y, None, mu, sgd).result.update))
        for mu in (0.0, 0.5, 2.0)  # lr * mu well below 2: explicit steps stay stable
    ]
    assert norms[0] > norms[1] > norms[2] > 0, norms


def test_the_proximal_term_is_the_gradient_of_mu_half_squared_distance():
    """The first step starts at the server model w0, where the term is zero; the
    second adds lr * mu * (w1 - w0) to the step, pulling w2 back towards w0."""
    x, y = _data(20)
    server = _server_weights(np.random.default_rng(3).normal(size=(784, 10)) * 0.05)
    lr, mu = 0.5, 2.0
    one_batch = _dataset(x, y, 20)
    opt = tff.learning.optimizers.build_sgdm(learning_rate=lr)
    first = client_update.client_update(_model(), one_batch, server, opt, None, mu)
    first_plain = client_update.client_update(_model(), one_batch, server, opt, None, 0.0)
    for a, b in zip(first.result.update, first_plain.result.update, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7)
    # Two identical batches: the second step's proximal gradient is mu * (w1 - w0).
    two = tf.data.Dataset.from_tensor_slices(next(iter(one_batch))).batch(20).repeat(2)
    with_prox = client_update.client_update(_model(), two, server, opt, None, mu)
    without = client_update.client_update(_model(), two, server, opt, None, 0.0)
    step1 = [np.asarray(u) for u in first_plain.result.update]  # w0 - w1
    for a, b, s in zip(with_prox.result.update, without.result.update, step1, strict=True):
        # w0 - w2 = (w0 - w1) + lr * (g(w1) + mu (w1 - w0)); the difference is -lr*mu*s.
        np.testing.assert_allclose(np.asarray(a) - np.asarray(b), -lr * mu * s, atol=1e-6)
