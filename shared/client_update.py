"""The gradient-clipping client update of TFF's "Composing Learning Algorithms"
tutorial, ported to TFF 0.87, and the `ClientWorkProcess` built around it.

Each step clips the gradient to a global L2 norm of at most `clip_norm` before
the client optimizer applies it. Besides the model delta, the update reports
the training loss and accuracy seen on the client (summed, so that the server
can weight them by example count).
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

ClientOutput = collections.namedtuple("ClientOutput", ["result", "metrics"])


def clip_gradients(grads: list[tf.Tensor], clip_norm: float) -> tuple[list[tf.Tensor], tf.Tensor]:
    """Scales `grads` so that their global norm is at most `clip_norm`."""
    clipped, norm = tf.clip_by_global_norm(grads, clip_norm)
    return clipped, norm


@tf.function
def client_update(
    model: tff.learning.models.VariableModel,
    dataset: tf.data.Dataset,
    server_weights: tff.learning.models.ModelWeights,
    optimizer: tff.learning.optimizers.Optimizer,
    clip_norm: float,
):
    """Trains `model` from `server_weights` on `dataset` with clipped gradients."""
    client_weights = tff.learning.models.ModelWeights.from_model(model)
    tf.nest.map_structure(lambda v, w: v.assign(w), client_weights, server_weights)
    trainable = tuple(client_weights.trainable)
    opt_state = optimizer.initialize(tuple(tf.TensorSpec(v.shape, v.dtype) for v in trainable))
    num_examples = tf.constant(0.0)
    loss_sum = tf.constant(0.0)
    correct = tf.constant(0.0)
    # A loop over an iterator, not `dataset.reduce`: the loop body is then
    # instantiated once per worker session instead of once per client, which
    # is most of a client's cost for small models (see README, Benchmark).
    for batch in iter(dataset):
        with tf.GradientTape() as tape:
            outputs = model.forward_pass(batch, training=True)
        grads = tape.gradient(outputs.loss, trainable)
        grads, _ = clip_gradients(grads, clip_norm)
        opt_state, new_weights = optimizer.next(opt_state, trainable, tuple(grads))
        tf.nest.map_structure(lambda v, w: v.assign(w), trainable, new_weights)
        batch_size = tf.cast(outputs.num_examples, tf.float32)
        predicted = tf.cast(tf.argmax(outputs.predictions, axis=-1), tf.int32)
        correct += tf.reduce_sum(
            tf.cast(tf.equal(predicted, tf.reshape(batch["y"], [-1])), tf.float32)
        )
        num_examples += batch_size
        loss_sum += outputs.loss * batch_size
    # Initial minus trained weights, as TFF's FedAvg does: the server optimizer
    # treats the delta as a gradient, so server SGD with rate 1 is plain FedAvg.
    delta = tf.nest.map_structure(tf.subtract, server_weights.trainable, list(trainable))
    result = tff.learning.templates.ClientResult(update=delta, update_weight=num_examples)
    metrics = collections.OrderedDict(loss_sum=loss_sum, correct=correct, num_examples=num_examples)
    return ClientOutput(result=result, metrics=metrics)


def _zero_initialized(next_creator, **kwargs):
    """A variable creator that starts numeric variables at zero, not at their
    initializer's value.

    TFF runs a computation's variable initializers on every call, so once per
    client. `client_update` overwrites every model weight with the server's
    before using it (and metric variables start at zero anyway), so the
    initial values are never seen; for the CNN, drawing its 1.2 M Glorot-normal
    initial weights took about 20 ms of a client's 60-70 ms.
    """
    shape, dtype = kwargs.get("shape"), kwargs.get("dtype")
    if shape is not None and dtype is not None:
        shape, dtype = tf.TensorShape(shape), tf.as_dtype(dtype)
        if shape.is_fully_defined() and (dtype.is_floating or dtype.is_integer):
            kwargs["initial_value"] = tf.zeros(shape, dtype)
    return next_creator(**kwargs)


def build_clipped_client_work(
    model_fn: Callable[[], tff.learning.models.VariableModel],
    client_learning_rate: float,
    clip_norm: float = 1.0,
) -> tff.learning.templates.ClientWorkProcess:
    """A `ClientWorkProcess` running `client_update` with client SGD."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    with tf.Graph().as_default():
        model = model_fn()
    data_type = tff.SequenceType(tff.types.tensorflow_to_type(model.input_spec))
    weights_type = tff.learning.models.weights_type_from_model(model)

    @tff.federated_computation
    def initialize_fn():
        return tff.federated_value((), tff.SERVER)

    @tff.tensorflow.computation(weights_type, data_type)
    def client_update_computation(weights, dataset):
        optimizer = tff.learning.optimizers.build_sgdm(learning_rate=client_learning_rate)
        with tf.variable_creator_scope(_zero_initialized):
            model = model_fn()
        return client_update(model, dataset, weights, optimizer, clip_norm)

    metrics_sum_type = tff.StructType(
        [("loss_sum", np.float32), ("correct", np.float32), ("num_examples", np.float32)]
    )

    @tff.tensorflow.computation(metrics_sum_type)
    def summarize(sums):
        n = tf.maximum(sums.num_examples, 1.0)
        return collections.OrderedDict(
            loss=sums.loss_sum / n, accuracy=sums.correct / n, num_examples=sums.num_examples
        )

    @tff.federated_computation(
        initialize_fn.type_signature.result,
        tff.FederatedType(weights_type, tff.CLIENTS),
        tff.FederatedType(data_type, tff.CLIENTS),
    )
    def next_fn(state, weights, client_data):
        outputs = tff.federated_map(client_update_computation, (weights, client_data))
        sums = tff.federated_sum(outputs.metrics)
        train = tff.federated_map(summarize, sums)
        measurements = tff.federated_zip(collections.OrderedDict(train=train))
        return tff.templates.MeasuredProcessOutput(state, outputs.result, measurements)

    return tff.learning.templates.ClientWorkProcess(initialize_fn, next_fn)
