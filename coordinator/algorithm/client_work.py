"""The client work block: what each sampled client computes from the model and its data.

    clipped      the tutorial's local training, every gradient clipped to
                 --clip-norm (shared/client_update.py)
    model_delta  the same, unclipped: what TFF's `build_model_delta_client_work`
                 computes for build_weighted_fed_avg / build_weighted_fed_prox

Both take the client optimizer (`--client-optimizer`, TFF's
`tff.learning.optimizers`), FedProx's proximal term (`--proximal-mu`) and
local epochs (`--local-epochs`, which repeats each client's dataset).

Type of `next`: `(<>@SERVER, {ModelWeights}@CLIENTS, {Sequence}@CLIENTS) ->
<state=<>@SERVER, result={ClientResult(update, update_weight)}@CLIENTS,
measurements=<train=<loss, accuracy, num_examples, dropped_clients,
dropped_examples>>@SERVER>`; `update` is initial minus trained weights,
`update_weight` the client's example count (0 for a client whose update or loss
was not finite: its update is zeroed, see shared/client_update.py).

FedProx's sign. The proximal term's gradient is `mu (w - w_server)`, which
pulls a client towards the server model (Li et al. 2020). TFF 0.87's
`build_weighted_fed_prox` adds `mu (w_server - w)` instead
(`proximal_client_work.py`: `delta_l2_regularizer * (y - x)` with `x` the
current and `y` the initial weights), which pushes clients away: measured on
this machine, one client's delta norm grew from 4.75 (mu 0) to 23.2 (mu 1) and
4086 (mu 5). fedcompose implements the paper; a test shows that with the sign
flipped it equals TFF's builder within 1e-5 (tests/test_blocks_match_tff.py).
"""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf
import tensorflow_federated as tff

from coordinator.algorithm import optimizers
from coordinator.algorithm.spec import AlgorithmSpec
from shared import client_update


def _optimizer_fn(spec: AlgorithmSpec) -> client_update.OptimizerFn:
    name = spec.blocks.client_optimizer
    params = spec.optimizer_parameters("client")
    return lambda: optimizers.build(name, spec.client_learning_rate, params)


def _clip_norm(spec: AlgorithmSpec) -> float | None:
    kind = spec.blocks.client_work
    if kind == "clipped":
        return spec.clip_norm
    if kind == "model_delta":
        return None
    raise ValueError(f"unknown client work {kind!r}")


def build(
    spec: AlgorithmSpec, model_fn: Callable[[], tff.learning.models.VariableModel]
) -> tff.learning.templates.ClientWorkProcess:
    """Defaults (clipped, sgd, no proximal term) give the tutorial's client work."""
    return client_update.build_client_work(
        model_fn, _optimizer_fn(spec), _clip_norm(spec), spec.blocks.proximal_mu
    )


def outcome_computation(
    spec: AlgorithmSpec,
    model_fn: Callable[[], tff.learning.models.VariableModel],
    dataset_fn: Callable[[tf.Tensor], tf.data.Dataset],
) -> tff.Computation:
    """`(ModelWeights, token) -> <finite, loss, examples>`: one client's update,
    recomputed, to name the clients whose update was not finite."""
    return client_update.client_outcome(
        model_fn, _optimizer_fn(spec), _clip_norm(spec), spec.blocks.proximal_mu, dataset_fn
    )


def update_from_token_computation(
    spec: AlgorithmSpec,
    model_fn: Callable[[], tff.learning.models.VariableModel],
    dataset_fn: Callable[[tf.Tensor], tf.data.Dataset],
) -> tff.Computation:
    """`(ModelWeights, token) -> ClientOutput`: the client work's per-client
    computation on `dataset_fn(token)`, with the dataset built in the same
    graph (see dataset_fusion.py)."""
    return client_update.client_update_from_token(
        model_fn, _optimizer_fn(spec), _clip_norm(spec), spec.blocks.proximal_mu, dataset_fn
    )


def client_step(
    spec: AlgorithmSpec,
    model_fn: Callable[[], tff.learning.models.VariableModel],
    dataset_fn: Callable[[tf.Tensor], tf.data.Dataset],
) -> Callable[[], client_update.ClientStep]:
    """The client work's per-client computation on `dataset_fn(token)`, for a
    loop over a worker's clients in one graph (see fused_share.py)."""
    return client_update.client_step(
        model_fn, _optimizer_fn(spec), _clip_norm(spec), spec.blocks.proximal_mu, dataset_fn
    )
