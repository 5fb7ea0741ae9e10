"""The learning algorithm, composed from TFF's four building blocks.

distributor (distributor.py) -> client work (client_work.py) -> aggregator
(aggregator.py) -> finalizer (finalizer.py), joined by TFF's
`compose_learning_process`, then given a dataset computation so that `next`
takes client tokens instead of datasets: each worker builds a client's
dataset from its own files, and only tokens and weights cross the wire.
Training builds each client's dataset inside its client update
(dataset_fusion.py): one TensorFlow call per client instead of two and no
dataset serialization between them; `fused_train_share` goes further and
makes a worker's whole share of a round one call (fused_share.py).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from coordinator.algorithm import (
    aggregator,
    client_work,
    dataset_fusion,
    distributor,
    finalizer,
    fused_share,
)
from coordinator.algorithm.spec import AlgorithmSpec
from shared import models, preprocessing


@dataclasses.dataclass(frozen=True)
class Algorithm:
    spec: AlgorithmSpec
    model_fn: Callable[[], tff.learning.models.VariableModel]
    process: tff.learning.templates.LearningProcess
    """Composed learning process whose `next` takes `{str}@CLIENTS` tokens."""
    evaluation: tff.learning.templates.LearningProcess
    """Federated evaluation whose `next` takes `{str}@CLIENTS` tokens."""
    train_outcome: tff.Computation
    """`(ModelWeights@SERVER, {str}@CLIENTS) -> {<finite, loss, examples>}@CLIENTS`:
    each client's update recomputed, to name those that were not finite."""
    eval_outcome: tff.Computation
    """`(ModelWeights@SERVER, {str}@CLIENTS) -> {<finite, loss, examples>}@CLIENTS`:
    each client's held-out loss, to name those that were not finite."""

    @property
    def empty_clients_harmless(self) -> bool:
        """Whether padding a round with empty clients changes nothing (see aggregator.py)."""
        return aggregator.empty_clients_harmless(self.spec)


def _train_dataset(spec: AlgorithmSpec, token: tf.Tensor) -> tf.data.Dataset:
    return preprocessing.client_dataset(
        token, "train", spec.batch_size, spec.local_epochs, spec.shuffle_buffer
    )


def _test_dataset(spec: AlgorithmSpec, token: tf.Tensor) -> tf.data.Dataset:
    return preprocessing.client_dataset(token, "test", spec.eval_batch_size)


def train_dataset_computation(spec: AlgorithmSpec) -> tff.Computation:
    @tff.tensorflow.computation(np.str_)
    def make_dataset(token: tf.Tensor) -> tf.data.Dataset:
        return _train_dataset(spec, token)

    return make_dataset


def test_dataset_computation(spec: AlgorithmSpec) -> tff.Computation:
    @tff.tensorflow.computation(np.str_)
    def make_dataset(token: tf.Tensor) -> tf.data.Dataset:
        return _test_dataset(spec, token)

    return make_dataset


def build_learning_process(spec: AlgorithmSpec) -> tff.learning.templates.LearningProcess:
    """The four building blocks, composed; `next` still takes datasets."""
    model_fn = models.model_fn_for(spec.model, spec.num_classes)
    weights_type = models.weights_type_of(model_fn)

    @tff.tensorflow.computation
    def initial_model_weights_fn() -> tff.learning.models.ModelWeights:
        return tff.learning.models.ModelWeights.from_model(model_fn())

    return tff.learning.templates.compose_learning_process(
        initial_model_weights_fn,
        distributor.build(spec, weights_type),
        client_work.build(spec, model_fn),
        aggregator.build(spec, weights_type.trainable),
        finalizer.build(spec, weights_type),
    )


def per_client(weights_type: tff.StructType, outcome: tff.Computation) -> tff.Computation:
    """Maps a `(weights, token) -> value` computation over a round's clients."""

    @tff.federated_computation(
        tff.FederatedType(weights_type, tff.SERVER), tff.FederatedType(np.str_, tff.CLIENTS)
    )
    def per_client(weights: tff.Value, tokens: tff.Value) -> tff.Value:
        return tff.federated_map(outcome, (tff.federated_broadcast(weights), tokens))

    return per_client


@tf.function
def held_out_loss(
    model: tff.learning.models.VariableModel,
    weights: tff.learning.models.ModelWeights,
    dataset: tf.data.Dataset,
) -> collections.OrderedDict[str, tf.Tensor]:
    model_weights = tff.learning.models.ModelWeights.from_model(model)
    tf.nest.map_structure(lambda v, w: v.assign(w), model_weights, weights)
    loss_sum, examples = tf.constant(0.0), tf.constant(0.0)
    for batch in iter(dataset):
        out = model.forward_pass(batch, training=False)
        n = tf.cast(out.num_examples, tf.float32)
        loss_sum += out.loss * n
        examples += n
    return collections.OrderedDict(
        finite=tf.math.is_finite(loss_sum),
        loss=loss_sum / tf.maximum(examples, 1.0),
        examples=examples,
    )


def _eval_outcome(
    spec: AlgorithmSpec,
    model_fn: Callable[[], tff.learning.models.VariableModel],
    weights_type: tff.StructType,
) -> tff.Computation:
    @tff.tensorflow.computation(weights_type, np.str_)
    def outcome(
        weights: tff.learning.models.ModelWeights, token: tf.Tensor
    ) -> collections.OrderedDict[str, tf.Tensor]:
        return held_out_loss(model_fn(), weights, _test_dataset(spec, token))

    return outcome


def build_process(spec: AlgorithmSpec) -> tff.learning.templates.LearningProcess:
    """The training process alone, `next` taking client tokens: TFF's composition
    with the dataset computation, each client's dataset then built inside its
    client update (dataset_fusion.py)."""
    model_fn = models.model_fn_for(spec.model, spec.num_classes)
    return dataset_fusion.compose_fused(
        train_dataset_computation(spec),
        build_learning_process(spec),
        client_work.update_from_token_computation(
            spec, model_fn, lambda token: _train_dataset(spec, token)
        ),
    )


def fused_train_share(spec: AlgorithmSpec, up_to_merge: tff.Computation) -> tff.Computation:
    """The training round's `up_to_merge` as one TensorFlow call over a vector of
    client tokens (fused_share.py); raises `fused_share.NotFusable`."""
    model_fn = models.model_fn_for(spec.model, spec.num_classes)

    def dataset_fn(token: tf.Tensor) -> tf.data.Dataset:
        return _train_dataset(spec, token)

    client_type = client_work.update_from_token_computation(
        spec, model_fn, dataset_fn
    ).type_signature
    return fused_share.fuse(
        up_to_merge, client_type, client_work.client_step(spec, model_fn, dataset_fn)
    )


def build(spec: AlgorithmSpec) -> Algorithm:
    model_fn = models.model_fn_for(spec.model, spec.num_classes)
    weights_type = models.weights_type_of(model_fn)
    process = build_process(spec)
    evaluation = tff.simulation.compose_dataset_computation_with_learning_process(
        test_dataset_computation(spec),
        # An iterator loop, not dataset.reduce: see shared/client_update.py.
        tff.learning.algorithms.build_fed_eval(
            model_fn, loop_implementation=tff.learning.LoopImplementation.DATASET_ITERATOR
        ),
    )
    train_outcome = client_work.outcome_computation(
        spec, model_fn, lambda token: _train_dataset(spec, token)
    )
    return Algorithm(
        spec=spec,
        model_fn=model_fn,
        process=process,
        evaluation=evaluation,
        train_outcome=per_client(weights_type, train_outcome),
        eval_outcome=per_client(weights_type, _eval_outcome(spec, model_fn, weights_type)),
    )


__all__ = ["Algorithm", "build", "build_learning_process", "build_process", "fused_train_share"]
