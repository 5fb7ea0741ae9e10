"""Building each client's dataset inside its client update changes nothing but speed.

`coordinator/algorithm/dataset_fusion.py` rewrites the composed `next` so that
the dataset computation and the client update run as one TensorFlow call per
client. The rewrite must keep `next`'s type, leave no map of the dataset
computation behind, refuse shapes it does not know, and give exactly the
weights of TFF's own (unfused) composition of the same blocks.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_federated as tff

from coordinator import algorithm
from coordinator.algorithm import client_work, compose, dataset_fusion
from shared import models
from tests.test_blocks_match_tff import _run, reference


def _maps_of(comp: tff.Computation, fn_type) -> int:
    from tensorflow_federated.python.core.impl.compiler import building_blocks

    bb = comp.to_building_block()
    count = 0
    stack = [bb]
    while stack:
        node = stack.pop()
        if isinstance(node, building_blocks.CompiledComputation) and (
            node.type_signature.is_equivalent_to(fn_type)
        ):
            count += 1
        stack.extend(node.children())
    return count


def test_fused_next_keeps_its_type_and_drops_the_dataset_map():
    spec = algorithm.AlgorithmSpec()
    dataset_comp = compose.train_dataset_computation(spec)
    unfused = tff.simulation.compose_dataset_computation_with_learning_process(
        dataset_comp, compose.build_learning_process(spec)
    )
    fused = algorithm.build(spec).process
    assert fused.next.type_signature == unfused.next.type_signature
    assert _maps_of(unfused.next, dataset_comp.type_signature) == 1
    assert _maps_of(fused.next, dataset_comp.type_signature) == 0


def test_fusion_refuses_what_it_cannot_rewrite():
    spec = algorithm.AlgorithmSpec()
    model_fn = models.model_fn_for(spec.model, spec.num_classes)
    fused = client_work.update_from_token_computation(
        spec, model_fn, lambda token: compose._train_dataset(spec, token)
    )
    # A stock builder's client work maps another computation: nothing to fuse.
    stock = tff.learning.algorithms.build_weighted_fed_avg(
        model_fn, client_optimizer_fn=tff.learning.optimizers.build_sgdm(0.1)
    )
    with pytest.raises(dataset_fusion.FusionError, match="expected one map"):
        dataset_fusion.compose_fused(compose.train_dataset_computation(spec), stock, fused)
    # A fused computation that does not take the dataset computation's token.
    eval_comp = compose.test_dataset_computation(spec)
    with pytest.raises(dataset_fusion.FusionError):
        dataset_fusion.compose_fused(
            eval_comp, compose.build_learning_process(spec), compose.train_dataset_computation(spec)
        )


@pytest.mark.slow
def test_fused_rounds_equal_tff_composition_bit_for_bit(shards2, tmp_path):
    """Fused and unfused processes, 3 rounds each in TFF's local context."""
    variants = {
        "clipped": ({}, {}),
        "epochs2_adam": ({"client_optimizer": "adam"}, {"local_epochs": 2}),
        "prox_delta": ({"client_work": "model_delta", "proximal_mu": 0.5}, {}),
    }
    runs = []
    for name, (blocks, spec) in variants.items():
        runs.append(_run(f"{name}_fused", blocks, **spec))
        runs.append(_run(f"{name}_unfused", blocks, stock={"builder": "unfused"}, **spec))
    got = reference(shards2, runs, tmp_path, "fusion")
    for name in variants:
        for i in (0, 1):
            a, b = got[f"{name}_fused__trainable_{i}"], got[f"{name}_unfused__trainable_{i}"]
            assert np.array_equal(a, b), f"{name} weights {i}: max |diff| {np.abs(a - b).max()}"
