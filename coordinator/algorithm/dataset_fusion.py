"""Building a client's dataset inside its client update: one computation per client.

`tff.simulation.compose_dataset_computation_with_learning_process` makes
`next` take client tokens by mapping a dataset computation over them and
handing the datasets to the client work. In TFF's C++ runtime a dataset that
leaves one TensorFlow computation for another is serialized
(`DatasetToGraphV2`, every example of the client embedded as a constant) and
rebuilt by the next (`DatasetFromGraph`, a graph import on a background
thread), and each of the two is a call of its own. For the linear model at
1,000 clients per round that was about a quarter of a worker's time (perf on
`worker_binary`: 9 % in `DatasetFromGraph`, 4 % in `DatasetToGraphV2`, plus a
second `Session::Run` and its thread hand-offs per client).

`compose_fused` composes the same way, then rewrites the composed `next`: the
pair `federated_map(dataset, tokens)` -> `federated_map(client update,
zip(weights, datasets))` becomes one `federated_map(fused, zip(weights,
tokens))`, where `fused` is the same client update traced with the same
dataset function into one graph. Every other part of the four blocks is left
as TFF composed it, the type of `next` is unchanged (checked), and results
are those of the unfused process (tests/test_blocks_match_tff.py compares with
TFF's own builders fed by the unfused composition).
"""

from __future__ import annotations

from collections.abc import Iterator

import tensorflow_federated as tff
from tensorflow_federated.python.core.impl.compiler import (
    building_block_factory,
    building_blocks,
    intrinsic_defs,
    transformations,
)
from tensorflow_federated.python.core.impl.computation import computation_impl
from tensorflow_federated.python.core.impl.context_stack import context_stack_impl


class FusionError(ValueError):
    """The composed `next` does not have the shape `compose_fused` rewrites."""


def compose_fused(
    dataset_computation: tff.Computation,
    process: tff.learning.templates.LearningProcess,
    fused_computation: tff.Computation,
) -> tff.learning.templates.LearningProcess:
    """`compose_dataset_computation_with_learning_process(dataset_computation,
    process)` with the client work's `client(weights, dataset_computation(token))`
    run as `fused_computation(weights, token)`.

    `fused_computation` (`(W, token) -> R`) must compute what the client work's
    `(W, dataset) -> R` computation computes on `dataset_computation(token)`;
    that computation is found by its type. Raises `FusionError` if the composed
    `next` does not map exactly these two one after the other.
    """
    composed = tff.simulation.compose_dataset_computation_with_learning_process(
        dataset_computation, process
    )
    dataset_type = dataset_computation.type_signature
    fused_type = fused_computation.type_signature
    if not (
        isinstance(fused_type, tff.FunctionType)
        and isinstance(fused_type.parameter, tff.StructType)
        and len(fused_type.parameter) == 2
        and fused_type.parameter[1].is_equivalent_to(dataset_type.parameter)
    ):
        raise FusionError(f"{fused_type} does not take what {dataset_type} takes")
    next_bb = transformations.to_call_dominant(composed.next.to_building_block())
    fused_bb = _fuse(
        next_bb,
        dataset_type,
        fused_type,
        fused_computation.to_compiled_building_block(),
    )
    if not fused_bb.type_signature.is_equivalent_to(composed.next.type_signature):
        raise FusionError(
            f"fusion changed the type of next: {composed.next.type_signature} -> "
            f"{fused_bb.type_signature}"
        )
    return tff.learning.templates.LearningProcess(
        initialize_fn=composed.initialize,
        # The composed type, not the block's: it keeps the Python containers
        # (LearningProcessOutput, ModelWeights) that the block's type drops.
        next_fn=computation_impl.ConcreteComputation(
            computation_proto=fused_bb.proto,
            context_stack=context_stack_impl.context_stack,
            annotated_type=composed.next.type_signature,
        ),
        get_model_weights=composed.get_model_weights,
        set_model_weights=composed.set_model_weights,
        get_hparams_fn=composed.get_hparams,
        set_hparams_fn=composed.set_hparams,
    )


def _walk(bb: building_blocks.ComputationBuildingBlock) -> Iterator:
    yield bb
    for child in bb.children():
        yield from _walk(child)


def _mapped_fn_type(value: building_blocks.ComputationBuildingBlock) -> tff.Type | None:
    """The type of `f` if `value` is `federated_map(<f, x>)`, else None."""
    if (
        isinstance(value, building_blocks.Call)
        and isinstance(value.function, building_blocks.Intrinsic)
        and value.function.uri == intrinsic_defs.FEDERATED_MAP.uri
        and isinstance(value.argument, building_blocks.Struct)
    ):
        return value.argument[0].type_signature
    return None


def _is_dataset_map(
    value: building_blocks.ComputationBuildingBlock, dataset_type: tff.FunctionType
) -> bool:
    fn_type = _mapped_fn_type(value)
    return fn_type is not None and fn_type.is_equivalent_to(dataset_type)


def _is_client_map(
    value: building_blocks.ComputationBuildingBlock,
    dataset_type: tff.FunctionType,
    fused_type: tff.FunctionType,
) -> bool:
    """Whether `value` maps a `(W, dataset) -> R` computation, `fused_type` being
    `(W, token) -> R` (parameter names aside)."""
    fn_type = _mapped_fn_type(value)
    if not isinstance(fn_type, tff.FunctionType):
        return False
    param = fn_type.parameter
    return (
        isinstance(param, tff.StructType)
        and len(param) == 2
        and param[0].is_equivalent_to(fused_type.parameter[0])
        and param[1].is_equivalent_to(dataset_type.result)
        and fn_type.result.is_equivalent_to(fused_type.result)
    )


def _fuse(
    next_bb: building_blocks.ComputationBuildingBlock,
    dataset_type: tff.FunctionType,
    fused_type: tff.FunctionType,
    fused_bb: building_blocks.ComputationBuildingBlock,
) -> building_blocks.Lambda:
    if not (
        isinstance(next_bb, building_blocks.Lambda)
        and isinstance(next_bb.result, building_blocks.Block)
    ):
        raise FusionError("next is not a lambda over a block after to_call_dominant")
    block = next_bb.result
    locals_ = list(block.locals)
    datasets = [i for i, (_, v) in enumerate(locals_) if _is_dataset_map(v, dataset_type)]
    updates = [i for i, (_, v) in enumerate(locals_) if _is_client_map(v, dataset_type, fused_type)]
    if len(datasets) != 1 or len(updates) != 1:
        raise FusionError(
            f"expected one map of the dataset and one of the client computation, got "
            f"{len(datasets)} and {len(updates)}"
        )
    d_name, d_value = locals_[datasets[0]]
    u_value = locals_[updates[0]][1]
    zipped = u_value.argument[1]
    if not isinstance(zipped, building_blocks.Reference):
        raise FusionError("the client computation is not mapped over a named zip")
    z_index = next((i for i, (n, _) in enumerate(locals_) if n == zipped.name), None)
    if z_index is None:
        raise FusionError(f"{zipped.name} is not a local of next")
    z_value = locals_[z_index][1]
    if not (
        isinstance(z_value, building_blocks.Call)
        and isinstance(z_value.function, building_blocks.Intrinsic)
        and z_value.function.uri == intrinsic_defs.FEDERATED_ZIP_AT_CLIENTS.uri
        and isinstance(z_value.argument, building_blocks.Struct)
        and len(z_value.argument) == 2
        and isinstance(z_value.argument[1], building_blocks.Reference)
        and z_value.argument[1].name == d_name
    ):
        raise FusionError("the client computation's data is not zip(weights, datasets)")
    uses = [r.name for r in _walk(next_bb) if isinstance(r, building_blocks.Reference)]
    if uses.count(d_name) != 1 or uses.count(zipped.name) != 1:
        raise FusionError("the datasets or their zip with the weights are used elsewhere")

    tokens = d_value.argument[1]
    new_zip = building_block_factory.create_federated_zip(
        building_blocks.Struct([z_value.argument[0], tokens])
    )
    new_update = building_block_factory.create_federated_map(
        fused_bb, building_blocks.Reference(zipped.name, new_zip.type_signature)
    )
    rewritten = []
    for i, (name, value) in enumerate(locals_):
        if i == datasets[0]:
            continue
        if i == z_index:
            value = new_zip
        elif i == updates[0]:
            value = new_update
        rewritten.append((name, value))
    return building_blocks.Lambda(
        next_bb.parameter_name,
        next_bb.parameter_type,
        building_blocks.Block(rewritten, block.result),
    )
