"""TFF's baseline tasks (Reddi et al. 2021) trained across the workers.

    task = coordinator.tasks.get("emnist62", model="2nn")
    federation.train(task.process("fedadam"), **task.train_kwargs(), rounds=...)

Each task is TFF's own `tff.simulation.baselines` constructor (its
preprocessing and its model), given the raw element spec of TFF's real
dataset; the preprocessing runs on the workers over their shards. Each has a
small generated stand-in with exactly that spec, so a fresh clone can train
it without the real files.

Modules:
    task.py         a built task: preprocess, model_fn (seeded), process (FedAvg/FedAdam)
    configured.py   a `--task` run's learning process, from the command's settings
    stand_in.py     small deterministic ClientData with a task's element spec
    emnist.py       EMNIST-62 character recognition
    cifar100.py     CIFAR-100 image classification
    shakespeare.py  Shakespeare next-character prediction
    stackoverflow.py  Stack Overflow next-word and tag prediction, and their vocabularies
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from shared.errors import UsageError

NAMES = ("emnist62", "cifar100", "shakespeare", "stackoverflow-words", "stackoverflow-tags")


@dataclasses.dataclass(frozen=True)
class Entry:
    """What the registry knows of a task before TensorFlow is imported."""

    name: str
    module: str
    builder: str
    small: Mapping[str, Any]
    """Constructor options of the stand-in tests (small models, short sequences)."""
    options: tuple[str, ...]
    """The constructor options `get` takes for this task."""


_ENTRIES = {
    "emnist62": Entry("emnist62", "emnist", "build", {"model": "cnn_dropout"}, ("model",)),
    "cifar100": Entry("cifar100", "cifar100", "build", {"crop": 24}, ("model", "crop")),
    "shakespeare": Entry(
        "shakespeare", "shakespeare", "build", {"sequence_length": 10}, ("sequence_length",)
    ),
    "stackoverflow-words": Entry(
        "stackoverflow-words",
        "stackoverflow",
        "build_words",
        {"vocab_size": 40, "sequence_length": 8},
        ("vocab_dir", "vocab_size", "sequence_length"),
    ),
    "stackoverflow-tags": Entry(
        "stackoverflow-tags",
        "stackoverflow",
        "build_tags",
        {"vocab_size": 40, "tag_vocab_size": 5},
        ("vocab_dir", "vocab_size", "tag_vocab_size"),
    ),
}


def entry(name: str) -> Entry:
    if name not in _ENTRIES:
        raise UsageError(f"unknown task {name!r}; choose one of {', '.join(NAMES)}")
    return _ENTRIES[name]


def _module(name: str) -> Any:
    import importlib

    return importlib.import_module(f"coordinator.tasks.{entry(name).module}")


def raw_element_spec(name: str) -> Any:
    """The raw element of TFF's real dataset for task `name`."""
    return _module(name).SPEC


def stand_in_data(name: str) -> tuple[Any, Any]:
    """The task's stand-in data: (train, test) TFF ClientData, same clients."""
    return _module(name).stand_in_data()


def get(
    name: str,
    *,
    small: bool = False,
    batch_size: int = 20,
    epochs: int = 1,
    shuffle_buffer: int | None = 1,
    max_elements: int | None = None,
    model_seed: int = 0,
    **options: Any,
) -> Any:
    """Task `name` built with TFF's constructor (a `coordinator.tasks.task.Task`).

    `small`: the stand-in tests' options (small models, short sequences)
    under any given ones. `shuffle_buffer` 1 keeps each client's examples in
    stored order (TFF's preprocessing shuffles without a seed, which no run
    could repeat); None is TFF's default buffer. Options by task: emnist62
    model (cnn_dropout, cnn, 2nn); cifar100 model (resnet18..152), crop;
    shakespeare sequence_length; stackoverflow-* vocab_dir (TFF's count
    files; none: the stand-in's own counts), vocab_size, sequence_length
    (words), tag_vocab_size (tags).
    """
    from coordinator.tasks import task as task_lib

    found = entry(name)
    unknown = sorted(set(options) - set(found.options))
    if unknown:
        raise UsageError(
            f"task {name} takes no option {', '.join(unknown)}; it takes "
            f"{', '.join(found.options) or 'none'}"
        )
    chosen = {**(found.small if small else {}), **options}
    module = _module(name)
    train, test = module.stand_in_data()
    spec = task_lib.client_spec(batch_size, epochs, shuffle_buffer, max_elements)
    build: Callable[..., Any] = getattr(module, found.builder)
    try:
        baseline = build(train, test, spec, **chosen)
    except ValueError as e:  # TFF's constructors check their options so
        raise UsageError(f"task {name}: {e}") from None
    return task_lib.Task(name, module.SPEC, baseline, model_seed, chosen)
