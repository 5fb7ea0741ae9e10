"""The learning algorithm, composed from TFF's four building blocks.

    spec.py         what the algorithm is made of, as plain settings
    distributor.py  the distributor block (broadcast)
    client_work.py  the client work block (clipped / model-delta local training,
                    client optimizer, FedProx, local epochs)
    aggregator.py   the aggregator block (mean, robust, compression, DP)
    finalizer.py    the finalizer block (server SGD, SGDM, Adam, Yogi, Adagrad)
    optimizers.py   TFF's optimizers by name, for client work and finalizer
    compose.py      the four blocks, composed, with the dataset computations
                    that let `next` take client tokens
    dataset_fusion.py  a client's dataset built inside its client update
    fused_share.py  a worker's share of a round (client updates, the aggregator's
                    per-client step, the accumulation) as one TensorFlow call
    user_process.py a learning process the user composed in Python, prepared for
                    the workers (or refused in one line)

The model and the client update, which run on the workers, live in `shared/`; the
privacy a DP aggregator spends is accounted in `coordinator.privacy`.
"""

from coordinator.algorithm.compose import (
    Algorithm,
    build,
    build_learning_process,
    build_process,
    fused_train_share,
)
from coordinator.algorithm.spec import AlgorithmSpec

__all__ = [
    "Algorithm",
    "AlgorithmSpec",
    "build",
    "build_learning_process",
    "build_process",
    "fused_train_share",
]
