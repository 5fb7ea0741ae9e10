"""TFF's "Composing Learning Algorithms" tutorial, ported to TFF 0.87's names.

One change beyond the names: the tutorial's update is client minus server
weights, which TFF's optimizer finalizer (weights minus rate times update,
the update taken as a gradient) turns into a step away from the clients;
this port subtracts the other way, as TFF's own FedAvg does, so that server
SGD at rate 1 is FedAvg with clipping. The notebook says so too.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

BATCH_SIZE = 20


@tf.function
def client_update(model, dataset, server_weights, client_optimizer):
    """Performs training (using the server model weights) on the client's dataset."""
    client_weights = tff.learning.models.ModelWeights.from_model(model)
    tf.nest.map_structure(lambda x, y: x.assign(y), client_weights, server_weights)
    num_examples = 0.0
    for batch in dataset:
        with tf.GradientTape() as tape:
            outputs = model.forward_pass(batch)
            num_examples += tf.cast(outputs.num_examples, tf.float32)
        grads = tape.gradient(outputs.loss, client_weights.trainable)
        gradient_norm = tf.linalg.global_norm(grads)
        if gradient_norm > 1:
            grads = tf.nest.map_structure(lambda x: x / gradient_norm, grads)  # noqa: B023
        client_optimizer.apply_gradients(zip(grads, client_weights.trainable, strict=True))
    client_update = tf.nest.map_structure(
        tf.subtract, server_weights.trainable, client_weights.trainable
    )
    return tff.learning.templates.ClientResult(update=client_update, update_weight=num_examples)


def build_gradient_clipping_client_work(model_fn, optimizer_fn):
    """Creates a client work process that uses gradient clipping."""
    with tf.Graph().as_default():
        model = model_fn()
    data_type = tff.SequenceType(tff.types.tensorflow_to_type(model.input_spec))
    model_weights_type = tff.learning.models.weights_type_from_model(model)

    @tff.federated_computation
    def initialize_fn():
        return tff.federated_value((), tff.SERVER)

    @tff.tensorflow.computation(model_weights_type, data_type)
    def client_update_computation(model_weights, dataset):
        model = model_fn()
        optimizer = optimizer_fn()
        return client_update(model, dataset, model_weights, optimizer)

    @tff.federated_computation(
        initialize_fn.type_signature.result,
        tff.FederatedType(model_weights_type, tff.CLIENTS),
        tff.FederatedType(data_type, tff.CLIENTS),
    )
    def next_fn(state, model_weights, client_dataset):
        client_result = tff.federated_map(
            client_update_computation, (model_weights, client_dataset)
        )
        measurements = tff.federated_value((), tff.SERVER)
        return tff.templates.MeasuredProcessOutput(state, client_result, measurements)

    return tff.learning.templates.ClientWorkProcess(initialize_fn, next_fn)


def preprocess(dataset):
    """Flatten a batch of EMNIST data and return a (features, label) tuple.

    fedcompose's workers serve TFF's EMNIST element (ink 0 on a background
    of 1); the tutorial's linear model learns far better with ink high
    (see the README's data section), hence `1 - pixels`."""

    def batch_format_fn(element):
        return (
            tf.reshape(1.0 - element["pixels"], [-1, 784]),
            tf.reshape(element["label"], [-1, 1]),
        )

    return dataset.batch(BATCH_SIZE).map(batch_format_fn)


def create_keras_model():
    initializer = tf.keras.initializers.GlorotNormal(seed=0)
    return tf.keras.models.Sequential(
        [
            tf.keras.layers.Input(shape=(784,)),
            tf.keras.layers.Dense(10, kernel_initializer=initializer),
            tf.keras.layers.Softmax(),
        ]
    )


def model_fn_for(element_spec):
    def model_fn():
        return tff.learning.models.from_keras_model(
            create_keras_model(),
            input_spec=element_spec,
            loss=tf.keras.losses.SparseCategoricalCrossentropy(),
            metrics=[tf.keras.metrics.SparseCategoricalAccuracy()],
        )

    return model_fn


def compose(model_fn, aggregator_factory=None, client_learning_rate: float = 0.3):
    """The tutorial's composition: broadcast, clipped client work, a mean, server SGD."""

    @tff.tensorflow.computation()
    def initial_model_weights_fn():
        return tff.learning.models.ModelWeights.from_model(model_fn())

    model_weights_type = initial_model_weights_fn.type_signature.result
    distributor = tff.learning.templates.build_broadcast_process(model_weights_type)
    client_work = build_gradient_clipping_client_work(
        model_fn, lambda: tf.keras.optimizers.SGD(learning_rate=client_learning_rate)
    )
    factory = aggregator_factory or tff.aggregators.MeanFactory()
    aggregator = factory.create(model_weights_type.trainable, tff.TensorType(np.float32))
    finalizer = tff.learning.templates.build_apply_optimizer_finalizer(
        tff.learning.optimizers.build_sgdm(learning_rate=1.0), model_weights_type
    )
    return tff.learning.templates.compose_learning_process(
        initial_model_weights_fn, distributor, client_work, aggregator, finalizer
    )
