"""A baseline task as fedcompose trains it: TFF's preprocessing and model, and
the learning process built from them.

TFF's `tff.simulation.baselines` constructors take the data as ClientData and
return a `BaselineTask` whose `datasets.train_preprocess_fn` /
`eval_preprocess_fn` turn a client's raw examples into batches and whose
`model_fn` builds the model. fedcompose never hands TFF the data here: the
constructors get a stand-in ClientData of the same element spec (the
functions they return depend on the spec only, and on the vocabularies), and
the preprocessing runs on the workers, over each worker's own clients.
"""

from __future__ import annotations

import collections
import dataclasses
import random
from collections.abc import Callable, Mapping
from typing import Any

import tensorflow as tf
import tensorflow_federated as tff

from shared.errors import UsageError

ALGORITHMS = ("fedavg", "fedadam")
"""The two server optimizers of Reddi et al. 2021 the docs give figures for."""

Spec = collections.OrderedDict
"""A raw element spec: TFF's ClientData element (key -> tf.TensorSpec)."""


@dataclasses.dataclass(frozen=True)
class Task:
    """One task, built: what `federation.train(...)` takes, and its process."""

    name: str
    raw_element_spec: Spec
    """One raw example as TFF's ClientData of the real dataset yields it."""
    baseline: tff.simulation.baselines.BaselineTask
    """TFF's own task object (its datasets hold the stand-in ClientData)."""
    model_seed: int
    options: Mapping[str, Any]
    """The constructor's options this task was built with (model, sizes...)."""

    @property
    def preprocess(self) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
        """TFF's train preprocessing: raw client examples -> the model's batches."""
        return self.baseline.datasets.train_preprocess_fn

    @property
    def eval_preprocess(self) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
        return self.baseline.datasets.eval_preprocess_fn

    @property
    def model_fn(self) -> Callable[[], tff.learning.models.VariableModel]:
        """TFF's model function, its initial weights fixed by `model_seed`."""
        return seeded(self.baseline.model_fn, self.model_seed)

    def process(
        self,
        algorithm: str = "fedavg",
        *,
        client_learning_rate: float = 0.1,
        server_learning_rate: float | None = None,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        epsilon: float = 1e-3,
    ) -> tff.learning.templates.LearningProcess:
        """TFF's weighted FedAvg with this task's model and client SGD: server
        SGD (`fedavg`, rate default 1), or server Adam (`fedadam`, Reddi et al.'s
        FedAdam, rate default 0.01; `epsilon` is their tau)."""
        if algorithm not in ALGORITHMS:
            raise UsageError(
                f"unknown algorithm {algorithm!r} for task {self.name}; choose one of "
                f"{', '.join(ALGORITHMS)}"
            )
        client = tff.learning.optimizers.build_sgdm(learning_rate=client_learning_rate)
        if algorithm == "fedavg":
            server = tff.learning.optimizers.build_sgdm(learning_rate=server_learning_rate or 1.0)
        else:
            server = tff.learning.optimizers.build_adam(
                learning_rate=server_learning_rate or 0.01,
                beta_1=beta_1,
                beta_2=beta_2,
                epsilon=epsilon,
            )
        return tff.learning.algorithms.build_weighted_fed_avg(
            self.model_fn, client_optimizer_fn=client, server_optimizer_fn=server
        )

    def train_kwargs(self) -> dict[str, Any]:
        """What `federation.train(process, **task.train_kwargs(), ...)` needs."""
        return {
            "preprocess": self.preprocess,
            "eval_preprocess": self.eval_preprocess,
            "model_fn": self.model_fn,
            "name": f"task {self.name}",
        }


def seeded(model_fn: Callable[[], Any], seed: int) -> Callable[[], Any]:
    """`model_fn` whose initial weights are a function of `seed`.

    The baseline models' Keras initializers are unseeded: each draws a seed
    from Python's `random` when the model is built, so every trace of the
    process (a resumed run, the same command run again) would start from
    other weights. Keras takes those seeds from its own seed generator when
    one is set (what `tf.keras.utils.set_random_seed` sets, with Python's,
    numpy's and TensorFlow's global seeds besides): here it is set for the
    model's construction only, and the caller's restored after. TFF's own
    `debug_seed` for EMNIST fixes the same initializers' seeds.
    """
    from keras.src import backend as keras_backend  # Keras 2.14, TFF 0.87's pin

    def model() -> Any:
        state = keras_backend._SEED_GENERATOR
        previous = getattr(state, "generator", None)
        python_state = random.getstate()
        state.generator = random.Random(seed)
        # TFF's EMNIST models draw their initializers' seeds from Python's own
        # `random` (unless given a debug seed, which would also fix their
        # preprocessing's shuffle): seeded too, for the model's construction only.
        random.seed(seed)
        try:
            if not tf.executing_eagerly():
                tf.random.set_seed(seed)  # ops seeded by the graph (dropout's, say)
            return model_fn()
        finally:
            state.generator = previous
            random.setstate(python_state)

    return model


def client_spec(
    batch_size: int, epochs: int, shuffle_buffer: int | None, max_elements: int | None
) -> tff.simulation.baselines.ClientSpec:
    return tff.simulation.baselines.ClientSpec(
        num_epochs=epochs,
        batch_size=batch_size,
        shuffle_buffer_size=shuffle_buffer,
        max_elements=max_elements,
    )
