"""The learning algorithm, composed from TFF's four building blocks.

    spec.py     what the algorithm is made of, as plain settings
    compose.py  distributor, client work, aggregator and finalizer, composed, with the
                dataset computations that let `next` take client tokens

The model and the clipped client update, which run on the workers, live in `shared/`.
"""

from coordinator.algorithm.compose import Algorithm, build, build_learning_process
from coordinator.algorithm.spec import AlgorithmSpec

__all__ = ["Algorithm", "AlgorithmSpec", "build", "build_learning_process"]
