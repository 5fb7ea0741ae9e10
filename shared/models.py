"""Model factories shared by coordinator and workers."""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf
import tensorflow_federated as tff

from shared import preprocessing, shard_format
from shared.config import MODELS


def linear_keras_model(num_classes: int) -> tf.keras.Model:
    """The tutorial's model: one dense softmax layer over the flat pixels."""
    initializer = tf.keras.initializers.GlorotNormal(seed=0)
    return tf.keras.models.Sequential(
        [
            tf.keras.layers.Input(shape=(shard_format.PIXELS,)),
            tf.keras.layers.Dense(num_classes, kernel_initializer=initializer),
            tf.keras.layers.Softmax(),
        ]
    )


def cnn_keras_model(num_classes: int) -> tf.keras.Model:
    """The CNN of TFF's federated EMNIST baselines (two conv, pool, dropout, dense)."""
    init = tf.keras.initializers.GlorotNormal
    return tf.keras.models.Sequential(
        [
            tf.keras.layers.Input(shape=(shard_format.PIXELS,)),
            tf.keras.layers.Reshape((*shard_format.IMAGE_SHAPE, 1)),
            tf.keras.layers.Conv2D(32, 3, activation="relu", kernel_initializer=init(seed=1)),
            tf.keras.layers.Conv2D(64, 3, activation="relu", kernel_initializer=init(seed=2)),
            tf.keras.layers.MaxPool2D(2),
            tf.keras.layers.Dropout(0.25, seed=3),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(128, activation="relu", kernel_initializer=init(seed=4)),
            tf.keras.layers.Dropout(0.5, seed=5),
            tf.keras.layers.Dense(num_classes, kernel_initializer=init(seed=6)),
            tf.keras.layers.Softmax(),
        ]
    )


def keras_model(name: str, num_classes: int) -> tf.keras.Model:
    if name == "linear":
        return linear_keras_model(num_classes)
    if name == "cnn":
        return cnn_keras_model(num_classes)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def weights_type_of(
    model_fn: Callable[[], tff.learning.models.VariableModel],
) -> tff.StructType:
    """The TFF type of the model's weights, from a model built in a throwaway
    graph (so that no variable of it lands in the caller's graph)."""
    with tf.Graph().as_default():
        return tff.learning.models.weights_type_from_model(model_fn())


def model_fn_for(name: str, num_classes: int) -> Callable[[], tff.learning.models.VariableModel]:
    """A no-arg factory of TFF models, as TFF's builders expect."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")

    def model_fn() -> tff.learning.models.VariableModel:
        return tff.learning.models.from_keras_model(
            keras_model(name, num_classes),
            input_spec=preprocessing.element_spec(),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(),
            metrics=[tf.keras.metrics.SparseCategoricalAccuracy()],
        )

    return model_fn
