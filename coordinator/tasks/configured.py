"""A `--task` run's learning process, from the command's settings.

`fedcompose train --task NAME` (and `run`) trains what the Python API trains
with `coordinator.tasks.get(NAME).process(...)`: TFF's weighted FedAvg with
the task's model, client SGD at --client-learning-rate, server SGD
(--server-optimizer sgd: FedAvg) or Adam (adam: FedAdam) at
--server-learning-rate; TFF's preprocessing with --batch-size,
--local-epochs and --shuffle-buffer runs on the workers.
"""

from __future__ import annotations

from typing import Any

from coordinator import tasks
from coordinator.algorithm.user_process import UserAlgorithm
from shared.config import RunConfig
from shared.errors import UsageError
from shared.shard_format import DataFormat


def _canonical(spec: Any) -> Any:
    """A spec with its dicts' keys sorted: the preprocessing reads fields by
    name, so only names, dtypes and shapes must agree, not the order."""
    if isinstance(spec, dict):
        return tuple(sorted((k, _canonical(v)) for k, v in spec.items()))
    if isinstance(spec, tuple):
        return tuple(_canonical(v) for v in spec)
    return spec


def check_data(name: str, data: DataFormat) -> None:
    """Refuses, naming both specs, workers whose examples are not the task's."""
    from shared import element_spec, tensor_reader

    wanted = tensor_reader.from_tf(tasks.raw_element_spec(name))
    if _canonical(data.spec) != _canonical(wanted):
        raise UsageError(
            f"--task {name} takes examples {element_spec.describe(wanted)}, but the workers' "
            f"shards hold {element_spec.describe(data.spec)}; serve shards of the task's data "
            f"(`fedcompose data --task {name}` for its stand-in) or choose another --task"
        )


def user_algorithm(config: RunConfig, data: DataFormat | None) -> UserAlgorithm:
    """The task's process over the workers' data (`data`: their format)."""
    m, t, a = config.model, config.training, config.algorithm
    if data is not None:
        check_data(m.task, data)
    options: dict[str, Any] = {}
    if m.task_model:
        if "model" not in tasks.entry(m.task).options:
            raise UsageError(f"--task-model does not apply to --task {m.task}: it has one model")
        options["model"] = m.task_model
    if m.task_vocab:
        options["vocab_dir"] = m.task_vocab
    task = tasks.get(
        m.task,
        batch_size=t.batch_size,
        epochs=t.local_epochs,
        shuffle_buffer=t.shuffle_buffer,
        model_seed=t.seed,
        **options,
    )
    process = task.process(
        "fedadam" if a.server_optimizer == "adam" else "fedavg",
        client_learning_rate=t.client_learning_rate,
        server_learning_rate=t.server_learning_rate,
        beta_1=a.server_beta_1,
        beta_2=a.server_beta_2,
        epsilon=a.server_epsilon,
    )
    return UserAlgorithm(
        process, task.preprocess, task.model_fn, task.eval_preprocess, f"task {m.task}", data
    )
