"""The finalizer block: how the server applies the aggregated update to its model.

    tff.learning.templates.build_apply_optimizer_finalizer(optimizer, weights_type)
    next: (<optimizer state>@SERVER, ModelWeights@SERVER, update@SERVER) ->
          <state@SERVER, result=ModelWeights@SERVER, measurements=<update_non_finite=int32>@SERVER>

with the server optimizer `--server-optimizer` at `--server-learning-rate`:
sgd (FedAvg at rate 1), sgdm, adam (FedAdam), yogi (FedYogi), adagrad
(FedAdagrad) of Reddi et al. 2021, "Adaptive Federated Optimization". The
update is initial minus trained weights, i.e. a pseudo-gradient. TFF's
finalizer leaves the model unchanged when the update is not finite and
reports `update_non_finite = 1`; the coordinator reports that round.
"""

from __future__ import annotations

import tensorflow_federated as tff

from coordinator.algorithm import optimizers
from coordinator.algorithm.spec import AlgorithmSpec


def server_optimizer(spec: AlgorithmSpec) -> tff.learning.optimizers.Optimizer:
    return optimizers.build(
        spec.blocks.server_optimizer,
        spec.server_learning_rate,
        spec.optimizer_parameters("server"),
    )


def build(
    spec: AlgorithmSpec, weights_type: tff.StructType
) -> tff.learning.templates.FinalizerProcess:
    return tff.learning.templates.build_apply_optimizer_finalizer(
        server_optimizer(spec), weights_type
    )
