"""A learning process a user composed in Python, prepared to run across the workers.

The user writes what TFF's tutorials teach: a client update, its
`ClientWorkProcess`, TFF's distributor, aggregator and finalizer factories,
`compose_learning_process` (or a ready builder such as
`tff.learning.algorithms.build_weighted_fed_avg`), and a preprocessing
function from a client's raw examples to the batches the model takes. Nothing
of it is installed on the workers: TFF serializes the TensorFlow.

Here the preprocessing becomes a dataset computation that each worker runs on
its own files (`preprocessing.raw_client_dataset`, in the element spec the
workers' manifests record: `UserAlgorithm.data`), composed onto the process with TFF's
`compose_dataset_computation_with_learning_process`, so that `next` takes
client tokens. The round is then split into TFF's mergeable form like
fedcompose's own algorithm. What does not fit is refused before round 1, in
one line: a process that does not take client datasets, a model whose input
is not what the preprocessing makes of the workers' data, a round TFF cannot
split.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from coordinator.executor_client import PreparedComputation
from coordinator.rounds.mergeable import compile_parts
from coordinator.rounds.prepared import PreparedAlgorithm
from shared import preprocessing, shard_format, tensor_reader
from shared.errors import UsageError

Preprocess = Callable[[tf.data.Dataset], tf.data.Dataset]
ModelFn = Callable[[], tff.learning.models.VariableModel]


@dataclasses.dataclass(frozen=True)
class UserAlgorithm:
    """A user's learning process and what it needs to run on the workers."""

    process: tff.learning.templates.LearningProcess
    preprocess: Preprocess
    """Raw client examples (`preprocessing.raw_element_spec`) -> the model's batches."""
    model_fn: ModelFn | None = None
    """The model, for held-out evaluation (TFF's `build_fed_eval`); None: no evaluation."""
    eval_preprocess: Preprocess | None = None
    """Test examples -> batches (default: `preprocess`)."""
    name: str = ""
    data: shard_format.DataFormat | None = None
    """The workers' data format (the federation's); None: emnist-fixed."""


def empty_raw_dataset(data: shard_format.DataFormat | None = None) -> tf.data.Dataset:
    """A dataset of no examples with the workers' raw element spec (`data`'s;
    default: TFF-EMNIST's): what a preprocessing function can be traced on to
    learn the spec it makes."""
    if data is not None and data.encoding == shard_format.STACKED_TENSORS:
        return tensor_reader.client_examples(tf.constant(""), tf.constant(True), data.spec)
    spec = preprocessing.raw_element_spec()
    return tf.data.Dataset.from_tensor_slices(
        collections.OrderedDict((k, tf.zeros([0, *s.shape], s.dtype)) for k, s in spec.items())
    )


def _describe_type(t: object) -> str:
    return str(t).replace("\n", " ")


def client_data_type(process: object) -> tff.SequenceType:
    """The element of the client data `process.next` takes, or a refusal."""
    if not isinstance(process, tff.templates.IterativeProcess):
        raise UsageError(
            f"expected a TFF learning process (tff.learning.templates.LearningProcess), got "
            f"{type(process).__name__}; compose one with "
            "tff.learning.templates.compose_learning_process or a tff.learning.algorithms builder"
        )
    if not isinstance(process, tff.learning.templates.LearningProcess):
        raise UsageError(
            "this tff.templates.IterativeProcess is not a tff.learning.templates.LearningProcess: "
            "fedcompose needs its get_model_weights and its (state, metrics) output to record "
            "and evaluate rounds; build it with compose_learning_process or wrap it in "
            "tff.learning.templates.LearningProcess(initialize, next, get_model_weights, "
            "set_model_weights)"
        )
    param = process.next.type_signature.parameter
    data = param[1] if isinstance(param, tff.StructType) and len(param) == 2 else None
    if (
        not isinstance(data, tff.FederatedType)
        or data.placement is not tff.CLIENTS
        or not isinstance(data.member, tff.SequenceType)
    ):
        raise UsageError(
            "the process's next must take (state@SERVER, client datasets@CLIENTS), i.e. a "
            f"tff.SequenceType placed at CLIENTS; it takes {_describe_type(param)}"
        )
    return data.member


def _dataset_computation(
    preprocess: Preprocess, split: str, data: shard_format.DataFormat | None
) -> tff.Computation:
    @tff.tensorflow.computation(np.str_)
    def client_dataset(token: tf.Tensor) -> tf.data.Dataset:
        return preprocess(preprocessing.raw_client_dataset(token, split, data))

    return client_dataset


def traced(
    preprocess: Preprocess, split: str, data: shard_format.DataFormat | None = None
) -> tff.Computation:
    """The dataset computation over the workers' `data` (None: emnist-fixed),
    or one line saying why the function cannot be one."""
    raw = tff.types.tensorflow_to_type(preprocessing.raw_element_spec(data))
    if not callable(preprocess):
        raise UsageError(f"preprocess must be a function of a tf.data.Dataset, got {preprocess!r}")
    try:
        comp = _dataset_computation(preprocess, split, data)
    except Exception as e:
        raise UsageError(
            f"the preprocessing function cannot run on the workers' {split} data "
            f"(elements {_describe_type(raw)}): {_cause(e)}"
        ) from e
    made = comp.type_signature.result
    if not isinstance(made, tff.SequenceType):
        raise UsageError(
            "the preprocessing function must return a tf.data.Dataset; given the workers' "
            f"{split} data (elements {_describe_type(raw)}) it returned {_describe_type(made)}"
        )
    return comp


def _cause(e: BaseException) -> str:
    """One line for an error from traced user code: AutoGraph puts its own
    "in user code:" and a stack before the error's own last line."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("in user code"):
        return lines[-1][:300]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def check_fits(made: tff.Type, taken: tff.Type, who: str) -> None:
    if not taken.is_assignable_from(made):
        raise UsageError(
            f"{who} takes elements {_describe_type(taken)}, but the preprocessing makes the "
            f"workers' data into {_describe_type(made)}; change the preprocessing or the "
            "model's input_spec so that they agree"
        )


def _model_input_type(model_fn: ModelFn) -> tff.Type:
    try:
        with tf.Graph().as_default():
            model = model_fn()
    except Exception as e:
        raise UsageError(f"model_fn() failed: {_cause(e)}") from e
    if not isinstance(model, tff.learning.models.VariableModel):
        raise UsageError(
            "model_fn must return a tff.learning.models.VariableModel (wrap a Keras model "
            f"with tff.learning.models.from_keras_model); it returned {type(model).__name__}"
        )
    return tff.types.tensorflow_to_type(model.input_spec)


def _leaves(t: tff.Type) -> list[int]:
    """The byte sizes of a type's tensors (unknown dimensions count as 1)."""
    if isinstance(t, tff.TensorType):
        dims = [d if d is not None else 1 for d in (t.shape or ())]
        return [int(np.prod(dims)) * np.dtype(t.dtype).itemsize]
    if isinstance(t, tff.StructType):
        return [size for member in t for size in _leaves(member)]
    return []


def _per_client_loss(
    model_fn: ModelFn,
    weights_type: tff.Type,
    make_dataset: Callable[[tf.Tensor], tf.data.Dataset],
) -> tff.Computation:
    """`(weights@SERVER, tokens@CLIENTS) -> {<finite, loss, examples>}@CLIENTS`: each
    client's loss at the round's starting weights (naming the clients whose
    data makes the model's loss non-finite)."""
    from coordinator.algorithm import compose

    @tff.tensorflow.computation(weights_type, np.str_)
    def outcome(
        weights: tff.learning.models.ModelWeights, token: tf.Tensor
    ) -> collections.OrderedDict[str, tf.Tensor]:
        return compose.held_out_loss(model_fn(), weights, make_dataset(token))

    return compose.per_client(weights_type, outcome)


def prepare(user: UserAlgorithm) -> PreparedAlgorithm:
    """Every computation a `RoundExecutor` runs, from the user's process."""
    element = client_data_type(user.process)
    train_data = traced(user.preprocess, "train", user.data)
    check_fits(train_data.type_signature.result.element, element.element, "the process")
    process = tff.simulation.compose_dataset_computation_with_learning_process(
        train_data, user.process
    )
    comps: dict[str, PreparedComputation] = {}
    _add_mergeable(comps, "train", process.next)
    comps["initialize"] = PreparedComputation(process.initialize, "initialize")
    comps["get_model_weights"] = PreparedComputation(process.get_model_weights, "get_model_weights")
    weights_type = process.get_model_weights.type_signature.result
    if user.model_fn is not None:
        model_input = _model_input_type(user.model_fn)
        check_fits(train_data.type_signature.result.element, model_input, "the model")
        test_data = traced(user.eval_preprocess or user.preprocess, "test", user.data)
        check_fits(test_data.type_signature.result.element, model_input, "the model")
        evaluation = tff.simulation.compose_dataset_computation_with_learning_process(
            test_data,
            tff.learning.algorithms.build_fed_eval(
                user.model_fn, loop_implementation=tff.learning.LoopImplementation.DATASET_ITERATOR
            ),
        )
        _add_mergeable(comps, "eval", evaluation.next)
        comps["eval.initialize"] = PreparedComputation(evaluation.initialize, "eval.initialize")
        comps["eval.set_model_weights"] = PreparedComputation(
            evaluation.set_model_weights, "eval.set_model_weights"
        )
        comps["train_outcome"] = PreparedComputation(
            _per_client_loss(
                user.model_fn, weights_type, _raw_then(user.preprocess, "train", user.data)
            ),
            "train_outcome",
        )
        test_dataset = _raw_then(user.eval_preprocess or user.preprocess, "test", user.data)
        comps["eval_outcome"] = PreparedComputation(
            _per_client_loss(user.model_fn, weights_type, test_dataset), "eval_outcome"
        )
    return PreparedAlgorithm(
        None,
        comps,
        description=user.name or _default_name(process),
        model_mb=sum(_leaves(weights_type)) / 2**20,
    )


def _raw_then(
    preprocess: Preprocess, split: str, data: shard_format.DataFormat | None
) -> Callable[[tf.Tensor], tf.data.Dataset]:
    return lambda token: preprocess(preprocessing.raw_client_dataset(token, split, data))


def _add_mergeable(comps: dict[str, PreparedComputation], name: str, comp: Any) -> None:
    try:
        parts = compile_parts(comp, name)
    except Exception as e:  # the compiler raises several kinds
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise UsageError(
            f"the {'round' if name == 'train' else 'evaluation'} cannot be split across "
            "workers: TFF's mergeable-form compiler refused its "
            f"{'next' if name == 'train' else 'evaluation'} computation "
            f"({type(e).__name__}: {first}); an aggregation that needs every client at once "
            "(a secure sum, a median) cannot run partly on each worker"
        ) from e
    for part, prepared in parts.items():
        comps[f"{name}.{part}"] = prepared


def _default_name(process: tff.learning.templates.LearningProcess) -> str:
    digest = hashlib.sha256(str(process.next.type_signature).encode()).hexdigest()[:8]
    return f"user-composed learning process ({digest})"
