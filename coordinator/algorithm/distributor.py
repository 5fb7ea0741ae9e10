"""The distributor block: how the server model reaches the sampled clients.

    broadcast  tff.learning.templates.build_broadcast_process(weights_type)
               next: (<>@SERVER, ModelWeights@SERVER) ->
                     <state=<>@SERVER, result={ModelWeights}@CLIENTS, measurements=<>@SERVER>

TFF 0.87 ships only the broadcast; a new distributor (e.g. one sending a
compressed or partial model) goes here, under a new name in
`shared.config.DISTRIBUTORS`.
"""

from __future__ import annotations

import tensorflow_federated as tff

from coordinator.algorithm.spec import AlgorithmSpec


def build(
    spec: AlgorithmSpec, weights_type: tff.StructType
) -> tff.learning.templates.DistributionProcess:
    name = spec.blocks.distributor
    if name == "broadcast":
        return tff.learning.templates.build_broadcast_process(weights_type)
    raise ValueError(f"unknown distributor {name!r}")
