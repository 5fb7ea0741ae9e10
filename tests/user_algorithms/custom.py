"""Blocks the built-in menu does not offer, written as a user would."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff


class CoordinateClippedMean(tff.aggregators.WeightedAggregationFactory):
    """Each client's update clipped coordinate by coordinate to +-limit, then
    the example-weighted mean: a few huge coordinates of one client cannot
    drag the model (TFF's clipping factories bound the whole norm instead).
    A user-written aggregator."""

    def __init__(self, limit: float = 0.01):
        self.limit = limit

    def create(self, value_type, weight_type):
        limit = self.limit

        @tff.federated_computation
        def initialize():
            return tff.federated_value((), tff.SERVER)

        @tff.tensorflow.computation(value_type)
        def clip(value):
            return tf.nest.map_structure(lambda v: tf.clip_by_value(v, -limit, limit), value)

        @tff.federated_computation(
            initialize.type_signature.result,
            tff.FederatedType(value_type, tff.CLIENTS),
            tff.FederatedType(weight_type, tff.CLIENTS),
        )
        def next_fn(state, value, weight):
            mean = tff.federated_mean(tff.federated_map(clip, value), weight)
            return tff.templates.MeasuredProcessOutput(
                state, mean, tff.federated_value((), tff.SERVER)
            )

        return tff.templates.AggregationProcess(initialize, next_fn)


def pooled_preprocess(dataset):
    """Ink high, 2x2 average-pooled to 14x14, one-hot labels: a preprocessing
    of the user's own, for a model of the user's own."""

    def to_batch(element):
        ink = 1.0 - tf.expand_dims(element["pixels"], -1)
        pooled = tf.nn.avg_pool2d(ink, ksize=2, strides=2, padding="VALID")
        return (
            tf.reshape(pooled, [-1, 196]),
            tf.one_hot(element["label"], 10),
        )

    return dataset.batch(16).map(to_batch)


def mlp_model_fn_for(element_spec):
    def model_fn():
        init = tf.keras.initializers.GlorotUniform
        keras_model = tf.keras.Sequential(
            [
                tf.keras.layers.Input(shape=(196,)),
                tf.keras.layers.Dense(32, activation="relu", kernel_initializer=init(seed=1)),
                tf.keras.layers.Dense(10, kernel_initializer=init(seed=2)),
            ]
        )
        return tff.learning.models.from_keras_model(
            keras_model,
            input_spec=element_spec,
            loss=tf.keras.losses.CategoricalCrossentropy(from_logits=True),
            metrics=[tf.keras.metrics.CategoricalAccuracy()],
        )

    return model_fn


def kmeans_preprocess(dataset):
    """k-means takes points: each image's ink as a flat vector."""
    return dataset.map(lambda e: tf.reshape(1.0 - e["pixels"], [784]))


def kmeans_process():
    return tff.learning.algorithms.build_fed_kmeans(
        num_clusters=10, data_shape=(784,), random_seed=(1, 2)
    )


def secure_sum_process(model_fn):
    """FedAvg whose mean sums securely: TFF keeps the secure sum out of the
    mergeable form's partial step, so it cannot run partly on each worker."""
    return tff.learning.algorithms.build_weighted_fed_avg(
        model_fn,
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=0.1),
        model_aggregator=tff.aggregators.MeanFactory(
            value_sum_factory=tff.aggregators.SecureSumFactory(1.0, -1.0)
        ),
    )


def non_learning_process():
    """A tff.templates.IterativeProcess over client data that is not a
    LearningProcess: it counts examples."""

    @tff.federated_computation
    def initialize():
        return tff.federated_value(0, tff.SERVER)

    data_type = tff.SequenceType(tff.TensorType(np.float32, [None, 784]))

    @tff.tensorflow.computation(data_type)
    def count(dataset):
        return dataset.reduce(np.int32(0), lambda n, batch: n + tf.shape(batch)[0])

    @tff.federated_computation(
        tff.FederatedType(np.int32, tff.SERVER), tff.FederatedType(data_type, tff.CLIENTS)
    )
    def next_fn(state, data):
        return tff.federated_sum(tff.federated_map(count, data))

    return tff.templates.IterativeProcess(initialize, next_fn)
