"""TFF's optimizers by name, for the client work and the finalizer blocks.

Parameter names are TFF-neutral (`beta_1`, `epsilon`, `initial_accumulator`);
`initial_accumulator` is TFF's `initial_preconditioner_value`.
"""

from __future__ import annotations

import tensorflow_federated as tff


def build(
    name: str, learning_rate: float, params: dict[str, float]
) -> tff.learning.optimizers.Optimizer:
    """`tff.learning.optimizers.build_<name>(learning_rate, ...)`.

    Type: a `tff.learning.optimizers.Optimizer`, whose `next(state, weights,
    gradients) -> (state, weights)` both the client update and
    `build_apply_optimizer_finalizer` call.
    """
    o = tff.learning.optimizers
    if name == "sgd":
        return o.build_sgdm(learning_rate=learning_rate)
    if name == "sgdm":
        return o.build_sgdm(learning_rate=learning_rate, momentum=params["momentum"])
    if name == "adam":
        return o.build_adam(
            learning_rate=learning_rate,
            beta_1=params["beta_1"],
            beta_2=params["beta_2"],
            epsilon=params["epsilon"],
        )
    if name == "yogi":
        return o.build_yogi(
            learning_rate=learning_rate,
            beta_1=params["beta_1"],
            beta_2=params["beta_2"],
            epsilon=params["epsilon"],
            initial_preconditioner_value=params["initial_accumulator"],
        )
    if name == "adagrad":
        return o.build_adagrad(
            learning_rate=learning_rate,
            initial_preconditioner_value=params["initial_accumulator"],
            epsilon=params["epsilon"],
        )
    raise ValueError(f"unknown optimizer {name!r}")
