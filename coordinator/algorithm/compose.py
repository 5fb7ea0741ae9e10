"""The learning algorithm, composed from TFF's four building blocks.

distributor (broadcast) -> client work (clipped local SGD) -> aggregator
(example-weighted mean) -> finalizer (server SGD), joined by
`compose_learning_process`, then given a dataset computation so that `next`
takes client tokens instead of datasets: each worker builds a client's
dataset from its own files, and only tokens and weights cross the wire.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from coordinator.algorithm.spec import AlgorithmSpec
from shared import client_update, models, preprocessing


@dataclasses.dataclass(frozen=True)
class Algorithm:
    spec: AlgorithmSpec
    model_fn: Callable[[], tff.learning.models.VariableModel]
    process: tff.learning.templates.LearningProcess
    """Composed learning process whose `next` takes `{str}@CLIENTS` tokens."""
    evaluation: tff.learning.templates.LearningProcess
    """Federated evaluation whose `next` takes `{str}@CLIENTS` tokens."""


def train_dataset_computation(spec: AlgorithmSpec) -> tff.Computation:
    @tff.tensorflow.computation(np.str_)
    def make_dataset(token):
        return preprocessing.client_dataset(
            token, "train", spec.batch_size, spec.local_epochs, spec.shuffle_buffer
        )

    return make_dataset


def test_dataset_computation(spec: AlgorithmSpec) -> tff.Computation:
    @tff.tensorflow.computation(np.str_)
    def make_dataset(token):
        return preprocessing.client_dataset(token, "test", spec.eval_batch_size)

    return make_dataset


def build_learning_process(spec: AlgorithmSpec) -> tff.learning.templates.LearningProcess:
    """The four building blocks, composed; `next` still takes datasets."""
    model_fn = models.model_fn_for(spec.model, spec.num_classes)
    with tf.Graph().as_default():
        weights_type = tff.learning.models.weights_type_from_model(model_fn())

    @tff.tensorflow.computation
    def initial_model_weights_fn():
        return tff.learning.models.ModelWeights.from_model(model_fn())

    distributor = tff.learning.templates.build_broadcast_process(weights_type)
    client_work = client_update.build_clipped_client_work(
        model_fn, spec.client_learning_rate, spec.clip_norm
    )
    aggregator = tff.aggregators.MeanFactory().create(
        weights_type.trainable, tff.TensorType(np.float32)
    )
    finalizer = tff.learning.templates.build_apply_optimizer_finalizer(
        tff.learning.optimizers.build_sgdm(learning_rate=spec.server_learning_rate),
        weights_type,
    )
    return tff.learning.templates.compose_learning_process(
        initial_model_weights_fn, distributor, client_work, aggregator, finalizer
    )


def build(spec: AlgorithmSpec) -> Algorithm:
    model_fn = models.model_fn_for(spec.model, spec.num_classes)
    process = tff.simulation.compose_dataset_computation_with_learning_process(
        train_dataset_computation(spec), build_learning_process(spec)
    )
    evaluation = tff.simulation.compose_dataset_computation_with_learning_process(
        test_dataset_computation(spec),
        # An iterator loop, not dataset.reduce: see shared/client_update.py.
        tff.learning.algorithms.build_fed_eval(
            model_fn, loop_implementation=tff.learning.LoopImplementation.DATASET_ITERATOR
        ),
    )
    return Algorithm(spec=spec, model_fn=model_fn, process=process, evaluation=evaluation)
