"""The client update that runs on the workers, and the `ClientWorkProcess` around it.

Two client works share one update:

* `clipped` (the default): the gradient-clipping update of TFF's "Composing
  Learning Algorithms" tutorial, ported to TFF 0.87: each step clips the
  gradient to a global L2 norm of at most `clip_norm` before the client
  optimizer applies it.
* `model_delta`: the same without clipping, which is what TFF's own
  `build_model_delta_client_work` (used by `build_weighted_fed_avg` and
  `build_weighted_fed_prox`) computes.

Both take any TFF optimizer (`tff.learning.optimizers`), FedProx's proximal
term and several local epochs (the dataset is repeated).

Non-finite updates. A client whose update or loss is not finite (a NaN in its
data, a diverging learning rate) would poison the aggregate; like TFF's own
client work, this one sends a zero update with weight zero instead. Unlike
TFF's, it says so: the round's metrics count such clients
(`dropped_clients`, `dropped_examples`) and the train loss and accuracy are
over the finite clients only, so the coordinator can name the clients and
apply its `--on-non-finite` policy (`client_outcome` recomputes one client's
update for that). For finite clients, values are exactly as without the check.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from shared import models

ClientOutput = collections.namedtuple("ClientOutput", ["result", "metrics"])

OptimizerFn = Callable[[], tff.learning.optimizers.Optimizer]

ClientStep = Callable[[object, tf.Tensor], ClientOutput]
"""`(model weights, token) -> ClientOutput`: one client's update, in a loop's body."""


def clip_gradients(grads: list[tf.Tensor], clip_norm: float) -> tuple[list[tf.Tensor], tf.Tensor]:
    """Scales `grads` so that their global norm is at most `clip_norm`."""
    clipped, norm = tf.clip_by_global_norm(grads, clip_norm)
    return clipped, norm


def _all_finite(tensors: object) -> tf.Tensor:
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in tf.nest.flatten(tensors)])


def _train(
    model: tff.learning.models.VariableModel,
    dataset: tf.data.Dataset,
    server_weights: tff.learning.models.ModelWeights,
    optimizer: tff.learning.optimizers.Optimizer,
    clip_norm: float | None,
    proximal_mu: float,
) -> tuple[list[tf.Tensor], tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Local training; returns the raw (unchecked) delta and sums."""
    client_weights = tff.learning.models.ModelWeights.from_model(model)
    tf.nest.map_structure(lambda v, w: v.assign(w), client_weights, server_weights)
    trainable = tuple(client_weights.trainable)
    opt_state = optimizer.initialize(tuple(tf.TensorSpec(v.shape, v.dtype) for v in trainable))
    num_examples = tf.constant(0.0)
    loss_sum = tf.constant(0.0)
    correct = tf.constant(0.0)
    # A loop over an iterator, not `dataset.reduce`: the loop body is then
    # instantiated once per worker session instead of once per client, which
    # is most of a client's cost for small models (docs/benchmark.md).
    for batch in iter(dataset):
        with tf.GradientTape() as tape:
            outputs = model.forward_pass(batch, training=True)
        grads = tape.gradient(outputs.loss, trainable)
        if clip_norm is not None:
            grads, _ = clip_gradients(grads, clip_norm)
        if proximal_mu != 0.0:
            grads = [
                g + proximal_mu * (w - w0)
                for g, w, w0 in zip(grads, trainable, server_weights.trainable, strict=True)
            ]
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
    finite = tf.logical_and(_all_finite(delta), tf.math.is_finite(loss_sum))
    return delta, finite, num_examples, loss_sum, correct


@tf.function
def client_update(
    model: tff.learning.models.VariableModel,
    dataset: tf.data.Dataset,
    server_weights: tff.learning.models.ModelWeights,
    optimizer: tff.learning.optimizers.Optimizer,
    clip_norm: float | None,
    proximal_mu: float = 0.0,
) -> ClientOutput:
    """Trains `model` from `server_weights` on `dataset`.

    `clip_norm`: clip every gradient to this global L2 norm (None: do not).
    `proximal_mu`: FedProx (Li et al. 2020): the gradient of
    `mu/2 |w - w_server|^2`, i.e. `mu (w - w_server)`, is added to every
    (clipped) loss gradient, pulling the client towards the server model.

    Returns `ClientOutput(ClientResult(update, weight), metric sums)`, with a
    zero update of weight zero if the update or the loss is not finite.
    """
    delta, finite, num_examples, loss_sum, correct = _train(
        model, dataset, server_weights, optimizer, clip_norm, proximal_mu
    )
    zero = tf.constant(0.0)
    delta = [tf.where(finite, d, tf.zeros_like(d)) for d in delta]
    result = tff.learning.templates.ClientResult(
        update=delta, update_weight=tf.where(finite, num_examples, zero)
    )
    metrics = collections.OrderedDict(
        loss_sum=tf.where(finite, loss_sum, zero),
        correct=tf.where(finite, correct, zero),
        num_examples=tf.where(finite, num_examples, zero),
        dropped_clients=tf.where(finite, zero, 1.0),
        dropped_examples=tf.where(finite, zero, num_examples),
    )
    return ClientOutput(result=result, metrics=metrics)


@tf.function
def _outcome(
    model: tff.learning.models.VariableModel,
    dataset: tf.data.Dataset,
    server_weights: tff.learning.models.ModelWeights,
    optimizer: tff.learning.optimizers.Optimizer,
    clip_norm: float | None,
    proximal_mu: float,
) -> collections.OrderedDict[str, tf.Tensor]:
    _, finite, num_examples, loss_sum, _ = _train(
        model, dataset, server_weights, optimizer, clip_norm, proximal_mu
    )
    return collections.OrderedDict(
        finite=finite, loss=loss_sum / tf.maximum(num_examples, 1.0), examples=num_examples
    )


def _zero_initialized(next_creator: Callable[..., tf.Variable], **kwargs: Any) -> tf.Variable:
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


def _check(clip_norm: float | None, proximal_mu: float) -> None:
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    if not np.isfinite(proximal_mu):
        raise ValueError(f"proximal_mu must be finite, got {proximal_mu}")


def client_outcome(
    model_fn: Callable[[], tff.learning.models.VariableModel],
    optimizer_fn: OptimizerFn,
    clip_norm: float | None,
    proximal_mu: float,
    dataset_fn: Callable[[tf.Tensor], tf.data.Dataset],
) -> tff.Computation:
    """`(model weights, client token) -> (finite, loss, examples)`: one client's
    update recomputed on its own, to tell which client of a round was not finite.

    Type: `(<trainable=..., non_trainable=...>, str) -> <finite=bool, loss=float32,
    examples=float32>`; `loss` is the client's mean training loss (NaN/inf when
    not finite).
    """
    _check(clip_norm, proximal_mu)
    weights_type = models.weights_type_of(model_fn)

    @tff.tensorflow.computation(weights_type, np.str_)
    def outcome(
        weights: tff.learning.models.ModelWeights, token: tf.Tensor
    ) -> collections.OrderedDict[str, tf.Tensor]:
        with tf.variable_creator_scope(_zero_initialized):
            model = model_fn()
        return _outcome(model, dataset_fn(token), weights, optimizer_fn(), clip_norm, proximal_mu)

    return outcome


def _update_from(
    model_fn: Callable[[], tff.learning.models.VariableModel],
    optimizer_fn: OptimizerFn,
    clip_norm: float | None,
    proximal_mu: float,
    weights: tff.learning.models.ModelWeights,
    dataset: tf.data.Dataset,
) -> ClientOutput:
    """The body of a client's update computation, whatever made its dataset."""
    optimizer = optimizer_fn()
    with tf.variable_creator_scope(_zero_initialized):
        model = model_fn()
    return client_update(model, dataset, weights, optimizer, clip_norm, proximal_mu)


def client_update_from_token(
    model_fn: Callable[[], tff.learning.models.VariableModel],
    optimizer_fn: OptimizerFn,
    clip_norm: float | None,
    proximal_mu: float,
    dataset_fn: Callable[[tf.Tensor], tf.data.Dataset],
) -> tff.Computation:
    """`(weights, token) -> ClientOutput`: what `build_client_work`'s client
    computation returns for `dataset_fn(token)`, with the dataset built in the
    same graph (see coordinator/algorithm/dataset_fusion.py for why)."""
    _check(clip_norm, proximal_mu)
    weights_type = models.weights_type_of(model_fn)

    @tff.tensorflow.computation(weights_type, np.str_)
    def client_update_from_token_computation(
        weights: tff.learning.models.ModelWeights, token: tf.Tensor
    ) -> ClientOutput:
        return _update_from(
            model_fn, optimizer_fn, clip_norm, proximal_mu, weights, dataset_fn(token)
        )

    return client_update_from_token_computation


def build_client_work(
    model_fn: Callable[[], tff.learning.models.VariableModel],
    optimizer_fn: OptimizerFn,
    clip_norm: float | None = 1.0,
    proximal_mu: float = 0.0,
) -> tff.learning.templates.ClientWorkProcess:
    """A `ClientWorkProcess` running `client_update`.

    Type of `next`: `(<>@SERVER, {ModelWeights}@CLIENTS, {Sequence}@CLIENTS) ->
    <state=<>@SERVER, result={ClientResult}@CLIENTS, measurements=<train=<loss,
    accuracy, num_examples, dropped_clients, dropped_examples>>@SERVER>`.
    """
    _check(clip_norm, proximal_mu)
    with tf.Graph().as_default():
        model = model_fn()
    data_type = tff.SequenceType(tff.types.tensorflow_to_type(model.input_spec))
    weights_type = tff.learning.models.weights_type_from_model(model)

    @tff.federated_computation
    def initialize_fn() -> tff.Value:
        return tff.federated_value((), tff.SERVER)

    @tff.tensorflow.computation(weights_type, data_type)
    def client_update_computation(
        weights: tff.learning.models.ModelWeights, dataset: tf.data.Dataset
    ) -> ClientOutput:
        return _update_from(model_fn, optimizer_fn, clip_norm, proximal_mu, weights, dataset)

    metrics_sum_type = tff.StructType(
        [
            ("loss_sum", np.float32),
            ("correct", np.float32),
            ("num_examples", np.float32),
            ("dropped_clients", np.float32),
            ("dropped_examples", np.float32),
        ]
    )

    @tff.tensorflow.computation(metrics_sum_type)
    def summarize(sums: tff.structure.Struct) -> collections.OrderedDict[str, tf.Tensor]:
        n = tf.maximum(sums.num_examples, 1.0)
        return collections.OrderedDict(
            loss=sums.loss_sum / n,
            accuracy=sums.correct / n,
            num_examples=sums.num_examples,
            dropped_clients=sums.dropped_clients,
            dropped_examples=sums.dropped_examples,
        )

    @tff.federated_computation(
        initialize_fn.type_signature.result,
        tff.FederatedType(weights_type, tff.CLIENTS),
        tff.FederatedType(data_type, tff.CLIENTS),
    )
    def next_fn(
        state: tff.Value, weights: tff.Value, client_data: tff.Value
    ) -> tff.templates.MeasuredProcessOutput:
        outputs = tff.federated_map(client_update_computation, (weights, client_data))
        sums = tff.federated_sum(outputs.metrics)
        train = tff.federated_map(summarize, sums)
        measurements = tff.federated_zip(collections.OrderedDict(train=train))
        return tff.templates.MeasuredProcessOutput(state, outputs.result, measurements)

    return tff.learning.templates.ClientWorkProcess(initialize_fn, next_fn)


def build_clipped_client_work(
    model_fn: Callable[[], tff.learning.models.VariableModel],
    client_learning_rate: float,
    clip_norm: float = 1.0,
) -> tff.learning.templates.ClientWorkProcess:
    """The tutorial's client work: clipped gradients, client SGD."""
    return build_client_work(
        model_fn,
        lambda: tff.learning.optimizers.build_sgdm(learning_rate=client_learning_rate),
        clip_norm,
    )


def client_step(
    model_fn: Callable[[], tff.learning.models.VariableModel],
    optimizer_fn: OptimizerFn,
    clip_norm: float | None,
    proximal_mu: float,
    dataset_fn: Callable[[tf.Tensor], tf.data.Dataset],
) -> Callable[[], ClientStep]:
    """What `client_update_from_token` computes, for a loop over many clients in
    one graph (coordinator/algorithm/fused_share.py): calling the result makes
    the model's variables (once, before the loop) and gives
    `(weights, token) -> ClientOutput` for one client."""
    _check(clip_norm, proximal_mu)

    def make() -> ClientStep:
        optimizer = optimizer_fn()
        with tf.variable_creator_scope(_zero_initialized):
            model = model_fn()

        def step(weights: object, token: tf.Tensor) -> ClientOutput:
            return client_update(
                model, dataset_fn(token), weights, optimizer, clip_norm, proximal_mu
            )

        return step

    return make
