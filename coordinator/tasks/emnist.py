"""EMNIST-62 character recognition (`emnist62`): TFF's
`emnist.char_recognition_tasks.create_character_recognition_task_from_datasets`.

Raw element: `label` int32 [], `pixels` float32 [28, 28] (ink 0 on a
background of 1), as `tff.simulation.datasets.emnist.load_data(only_digits=False)`
yields it. Models: `cnn_dropout` (Reddi et al.'s, the default at real scale),
`cnn` (McMahan et al.'s, no dropout) and `2nn` (two dense layers of 200, no
dropout).
"""

from __future__ import annotations

import collections

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from coordinator.tasks import stand_in
from coordinator.tasks.stand_in import BaselineTask, ClientData, ClientSpec

NAME = "emnist62"
SPEC = collections.OrderedDict(
    label=tf.TensorSpec(shape=[], dtype=tf.int32),
    pixels=tf.TensorSpec(shape=[28, 28], dtype=tf.float32),
)
MODELS = ("cnn_dropout", "cnn", "2nn")
CLASSES = 62
_STAND_IN_CLASSES = 6


def _prototypes() -> np.ndarray:
    """One 28x28 ink pattern per stand-in class (a few strokes each)."""
    rng = np.random.default_rng(stand_in.SEED)
    ink = np.zeros((_STAND_IN_CLASSES, 28, 28), np.float32)
    for c in range(_STAND_IN_CLASSES):
        for _ in range(3):
            row, col = rng.integers(4, 24, size=2)
            ink[c, row - 3 : row + 3, col - 1 : col + 1] = 1.0
            ink[c, row - 1 : row + 1, col - 3 : col + 3] = 1.0
    return ink


def _client(rng: np.random.Generator, index: int, examples: int) -> dict:
    # Each writer uses a few of the classes, as real writers skew their labels.
    classes = rng.choice(_STAND_IN_CLASSES, size=3, replace=False)
    labels = rng.choice(classes, size=examples)
    ink = _prototypes()[labels] * rng.uniform(0.7, 1.0, size=(examples, 28, 28))
    # Spread over all 62 label values the real data has, not only 0..5.
    return {"label": labels * (CLASSES // _STAND_IN_CLASSES), "pixels": 1.0 - ink}


def stand_in_data() -> tuple[ClientData, ClientData]:
    return stand_in.train_and_test(SPEC, _client, train_examples=12, test_examples=6)


def build(
    train: ClientData,
    test: ClientData,
    spec: ClientSpec,
    *,
    model: str = "cnn_dropout",
    **_: object,
) -> BaselineTask:
    baselines = tff.simulation.baselines.emnist.char_recognition_tasks
    return baselines.create_character_recognition_task_from_datasets(
        train_client_spec=spec,
        eval_client_spec=None,
        model_id=model,
        only_digits=False,
        train_data=train,
        test_data=test,
    )
