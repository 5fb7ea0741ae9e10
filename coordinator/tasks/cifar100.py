"""CIFAR-100 image classification (`cifar100`): TFF's
`cifar100.image_classification_tasks.create_image_classification_task_with_datasets`.

Raw element: `coarse_label` int64 [], `image` uint8 [32, 32, 3], `label`
int64 [], as `tff.simulation.datasets.cifar100.load_data()` yields it. Model:
TFF's ResNet with group normalization (`resnet18` ... `resnet152`); Reddi et
al. train ResNet-18 on 24x24 crops (TFF's defaults), as do the stand-in tests.
"""

from __future__ import annotations

import collections

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from coordinator.tasks import stand_in
from coordinator.tasks.stand_in import BaselineTask, ClientData, ClientSpec

NAME = "cifar100"
SPEC = collections.OrderedDict(
    coarse_label=tf.TensorSpec(shape=[], dtype=tf.int64),
    image=tf.TensorSpec(shape=[32, 32, 3], dtype=tf.uint8),
    label=tf.TensorSpec(shape=[], dtype=tf.int64),
)
MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
_STAND_IN_CLASSES = 5


def _client(rng: np.random.Generator, index: int, examples: int) -> dict:
    # A class is a colour; the images are that colour plus noise.
    colours = np.random.default_rng(stand_in.SEED).integers(0, 256, (_STAND_IN_CLASSES, 3))
    classes = rng.choice(_STAND_IN_CLASSES, size=examples)
    noise = rng.normal(0, 40, size=(examples, 32, 32, 3))
    images = np.clip(colours[classes][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    labels = classes * 20 + index  # spread over the 100 labels
    return {"coarse_label": labels // 5, "image": images, "label": labels}


def stand_in_data() -> tuple[ClientData, ClientData]:
    return stand_in.train_and_test(SPEC, _client, train_examples=8, test_examples=4)


def build(
    train: ClientData,
    test: ClientData,
    spec: ClientSpec,
    *,
    model: str = "resnet18",
    crop: int = 24,
    **_: object,
) -> BaselineTask:
    baselines = tff.simulation.baselines.cifar100.image_classification_tasks
    return baselines.create_image_classification_task_with_datasets(
        train_client_spec=spec,
        eval_client_spec=None,
        model_id=model,
        crop_height=crop,
        crop_width=crop,
        distort_train_images=False,
        train_data=train,
        test_data=test,
    )
