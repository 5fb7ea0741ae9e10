"""Stack Overflow next-word prediction (`stackoverflow-words`) and tag
prediction (`stackoverflow-tags`): TFF's
`stackoverflow.word_prediction_tasks.create_word_prediction_task_from_datasets`
and `stackoverflow.tag_prediction_tasks.create_tag_prediction_task_from_datasets`.

Raw element: `creation_date`, `tags` ('|'-separated), `title`, `tokens`
(space-separated), `type` strings [] and `score` int64 [], as
`tff.simulation.datasets.stackoverflow.load_data()` yields it.

Both need vocabularies, which become constants of the preprocessing graph, so
the coordinator must know them before round 1. At real scale they are TFF's
count files (`stackoverflow.word_count`: one `word count` line per word, most
frequent first; `stackoverflow.tag_count`: JSON tag -> count), read from the
directory given (`vocab_dir`), never downloaded at run time; Reddi et al. use
the 10,000 most frequent words and 500 tags (TFF's defaults). For the
stand-in, both are counted from the stand-in's own training data, which is a
fixed function of the task, so `fedcompose data` and the coordinator agree.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from coordinator.tasks import stand_in
from coordinator.tasks.stand_in import BaselineTask, ClientData, ClientSpec
from shared.errors import DataError

WORDS = "stackoverflow-words"
TAGS = "stackoverflow-tags"
SPEC = collections.OrderedDict(
    creation_date=tf.TensorSpec(shape=[], dtype=tf.string),
    score=tf.TensorSpec(shape=[], dtype=tf.int64),
    tags=tf.TensorSpec(shape=[], dtype=tf.string),
    title=tf.TensorSpec(shape=[], dtype=tf.string),
    tokens=tf.TensorSpec(shape=[], dtype=tf.string),
    type=tf.TensorSpec(shape=[], dtype=tf.string),
)
WORD_COUNTS = "stackoverflow.word_count"
TAG_COUNTS = "stackoverflow.tag_count"
_TOPICS = 4
_TOPIC_WORDS = 8
_BASELINES = tff.simulation.baselines.stackoverflow
_COMMON = ("the", "a", "i", "to", "is", "it", "in", "how")


def _topic_words(topic: int) -> list[str]:
    return [
        f"{name}{topic}" for name in ("list", "call", "type", "loop", "file", "map", "key", "row")
    ][:_TOPIC_WORDS]


def _client(rng: np.random.Generator, index: int, examples: int) -> dict:
    # A user writes about a topic or two; a post's tags follow its topic's words.
    topics = rng.choice(_TOPICS, size=2, replace=False)
    out: dict[str, list] = {key: [] for key in SPEC}
    for _ in range(examples):
        topic = int(rng.choice(topics))
        vocabulary = _topic_words(topic) + list(_COMMON)
        words = rng.choice(vocabulary, size=int(rng.integers(5, 12)))
        out["tokens"].append(" ".join(words).encode())
        out["title"].append(" ".join(rng.choice(_topic_words(topic), size=3)).encode())
        tags = [f"topic{topic}"] + (["python"] if topic % 2 else [])
        out["tags"].append("|".join(tags).encode())
        out["creation_date"].append(b"2017-06-01 12:00:00.000000 UTC")
        out["score"].append(int(rng.integers(-2, 20)))
        out["type"].append(b"question" if rng.random() < 0.5 else b"answer")
    return {
        key: np.array(value, dtype=object if key != "score" else np.int64)
        for key, value in out.items()
    }


def stand_in_data() -> tuple[ClientData, ClientData]:
    return stand_in.train_and_test(SPEC, _client, train_examples=8, test_examples=4)


def _counts(values: Iterable[str]) -> list[str]:
    counts = collections.Counter(values)
    return [word for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]


def stand_in_vocabularies() -> tuple[list[str], list[str]]:
    """Words and tags of the stand-in's training data, most frequent first."""
    train, _ = stand_in_data()
    words, tags = [], []
    for client in train.client_ids:
        for example in train.create_tf_dataset_for_client(client).as_numpy_iterator():
            words += example["tokens"].decode().split(" ")
            tags += example["tags"].decode().split("|")
    return _counts(words), _counts(tags)


def real_vocabularies(vocab_dir: str | Path) -> tuple[list[str], list[str]]:
    """TFF's count files in `vocab_dir` (or its `datasets/`, where Keras caches
    them), most frequent first; one line saying what is missing otherwise."""
    root = Path(vocab_dir).expanduser()
    for where in (root, root / "datasets"):
        if (where / WORD_COUNTS).is_file() and (where / TAG_COUNTS).is_file():
            break
    else:
        raise DataError(
            f"{root} holds no {WORD_COUNTS} and {TAG_COUNTS}: extract TFF's "
            "stackoverflow.word_count.tar.bz2 and stackoverflow.tag_count.tar.bz2 "
            "(tff.simulation.datasets.stackoverflow.load_word_counts / load_tag_counts "
            "download them) into it"
        )
    try:
        words = [
            line.split()[0]
            for line in (where / WORD_COUNTS).read_text().splitlines()
            if line.strip()
        ]
        tag_counts = json.loads((where / TAG_COUNTS).read_text())
    except (OSError, ValueError, IndexError) as e:
        raise DataError(f"cannot read the Stack Overflow counts in {where}: {e}") from None
    tags = [tag for tag, _ in sorted(tag_counts.items(), key=lambda item: -item[1])]
    return words, tags


def vocabularies(vocab_dir: str | Path | None) -> tuple[list[str], list[str]]:
    return real_vocabularies(vocab_dir) if vocab_dir else stand_in_vocabularies()


def build_words(
    train: ClientData,
    test: ClientData,
    spec: ClientSpec,
    *,
    vocab_dir: str | None = None,
    vocab_size: int = 10_000,
    sequence_length: int = 20,
    **_: object,
) -> BaselineTask:
    words, _tags = vocabularies(vocab_dir)
    return _BASELINES.word_prediction_tasks.create_word_prediction_task_from_datasets(
        train_client_spec=spec,
        eval_client_spec=None,
        sequence_length=sequence_length,
        vocab=words[:vocab_size],
        num_out_of_vocab_buckets=1,
        train_data=train,
        test_data=test,
        validation_data=None,
    )


def build_tags(
    train: ClientData,
    test: ClientData,
    spec: ClientSpec,
    *,
    vocab_dir: str | None = None,
    vocab_size: int = 10_000,
    tag_vocab_size: int = 500,
    **_: object,
) -> BaselineTask:
    words, tags = vocabularies(vocab_dir)
    return _BASELINES.tag_prediction_tasks.create_tag_prediction_task_from_datasets(
        train_client_spec=spec,
        eval_client_spec=None,
        word_vocab=words[:vocab_size],
        tag_vocab=tags[:tag_vocab_size],
        train_data=train,
        test_data=test,
        validation_data=None,
    )
