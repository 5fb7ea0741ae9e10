"""Shakespeare next-character prediction (`shakespeare`): TFF's
`shakespeare.char_prediction_tasks.create_character_prediction_task_from_datasets`.

Raw element: `snippets` string [] (a contiguous piece of one role's lines),
as `tff.simulation.datasets.shakespeare.load_data()` yields it. Model: TFF's
two LSTM layers of 256 over 8-dimensional character embeddings; sequences of
80 characters at real scale (TFF's default), 10 in the stand-in tests.
"""

from __future__ import annotations

import collections

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from coordinator.tasks import stand_in
from coordinator.tasks.stand_in import BaselineTask, ClientData, ClientSpec

NAME = "shakespeare"
SPEC = collections.OrderedDict(snippets=tf.TensorSpec(shape=[], dtype=tf.string))
_WORDS = ("to", "be", "or", "not", "that", "is", "the", "question", "my", "lord")


def _client(rng: np.random.Generator, index: int, examples: int) -> dict:
    # Each role has its own favourite words: the next character is predictable.
    favourites = rng.choice(len(_WORDS), size=4, replace=False)
    lines = []
    for _ in range(examples):
        words = [_WORDS[i] for i in rng.choice(favourites, size=int(rng.integers(4, 9)))]
        lines.append((" ".join(words).capitalize() + ".").encode())
    return {"snippets": np.array(lines, dtype=object)}


def stand_in_data() -> tuple[ClientData, ClientData]:
    return stand_in.train_and_test(SPEC, _client, train_examples=6, test_examples=3)


def build(
    train: ClientData, test: ClientData, spec: ClientSpec, *, sequence_length: int = 80, **_: object
) -> BaselineTask:
    baselines = tff.simulation.baselines.shakespeare.char_prediction_tasks
    return baselines.create_character_prediction_task_from_datasets(
        train_client_spec=spec,
        eval_client_spec=None,
        sequence_length=sequence_length,
        train_data=train,
        test_data=test,
    )
