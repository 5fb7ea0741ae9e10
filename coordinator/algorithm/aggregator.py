"""The aggregator block: how the clients' updates become one update at the server.

Every choice is a TFF aggregation factory, composed the way TFF's own presets
compose it (`tff.learning.robust_aggregator`, `compression_aggregator`,
`dp_aggregator` in `learning/model_update_aggregator.py`):

    mean         tff.aggregators.MeanFactory()  (--weighting examples, the default)
                 tff.aggregators.UnweightedMeanFactory()  (--weighting uniform)
    robust       zeroing_factory(Z, clipping_factory(C, mean)); Z, C adaptive
                 (TFF's quantile estimates) unless --zeroing-norm / --clipping-norm
    compression  the same around a mean whose sum is
                 EncodedSumFactory.quantize_above_threshold(bits, threshold)
    dp_fixed     [zeroing_factory(Z, ...)] DifferentiallyPrivateFactory.gaussian_fixed(
                     noise_multiplier, clients_per_round, clip)
    dp_adaptive  [zeroing_factory(Z, ...)] DifferentiallyPrivateFactory.gaussian_adaptive(
                     noise_multiplier, clients_per_round, initial clip, target quantile,
                     learning rate)
    secure       refused before round 1 (shared.config.REFUSED_AGGREGATORS)

Type of `next` (after `as_weighted_aggregator` for the unweighted ones):
`(state@SERVER, {update}@CLIENTS, {float32}@CLIENTS) -> <state@SERVER,
result=update@SERVER, measurements@SERVER>`.

Empty clients. The coordinator pads a worker's clients with empty ones (no
examples, a zero update of weight zero) to reuse executors. That changes no
example-weighted sum, but it does change anything that counts clients: an
unweighted mean, DP (a normalized sum and a clipped count), a quantile
estimate of adaptive zeroing or clipping. `empty_clients_harmless` says
whether an aggregator is free of all of these; only then may rounds be padded.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow_federated as tff

from coordinator.algorithm.spec import AlgorithmSpec


def _adaptive_zeroing_norm() -> tff.templates.EstimationProcess:
    # TFF's default zeroing estimate (model_update_aggregator._default_zeroing):
    # adapts quickly to somewhat above the largest values seen so far.
    return tff.aggregators.PrivateQuantileEstimationProcess.no_noise(
        initial_estimate=10.0,
        target_quantile=0.98,
        learning_rate=math.log(10.0),
        multiplier=2.0,
        increment=1.0,
    )


def _adaptive_clipping_norm() -> tff.templates.EstimationProcess:
    # TFF's default clipping estimate (model_update_aggregator._default_clipping).
    return tff.aggregators.PrivateQuantileEstimationProcess.no_noise(
        initial_estimate=1.0, target_quantile=0.8, learning_rate=0.2
    )


def _mean(
    spec: AlgorithmSpec,
    value_sum_factory: tff.aggregators.UnweightedAggregationFactory | None = None,
) -> tff.aggregators.AggregationFactory:
    if spec.blocks.weighting == "examples":
        return tff.aggregators.MeanFactory(value_sum_factory)
    return tff.aggregators.UnweightedMeanFactory(value_sum_factory)


def _with_zeroing(
    spec: AlgorithmSpec, factory: tff.aggregators.AggregationFactory
) -> tff.aggregators.AggregationFactory:
    b = spec.blocks
    if not b.zeroing:
        return factory
    norm = b.zeroing_norm if b.zeroing_norm > 0 else _adaptive_zeroing_norm()
    return tff.aggregators.zeroing_factory(norm, factory)


def _with_clipping(
    spec: AlgorithmSpec, factory: tff.aggregators.AggregationFactory
) -> tff.aggregators.AggregationFactory:
    b = spec.blocks
    if not b.clipping:
        return factory
    norm = b.clipping_norm if b.clipping_norm > 0 else _adaptive_clipping_norm()
    return tff.aggregators.clipping_factory(norm, factory)


def factory(spec: AlgorithmSpec) -> tff.aggregators.AggregationFactory:
    """The TFF aggregation factory for the spec's aggregator."""
    b = spec.blocks
    name = b.aggregator
    if name == "mean":
        return _mean(spec)
    if name == "robust":
        return _with_zeroing(spec, _with_clipping(spec, _mean(spec)))
    if name == "compression":
        quantized = tff.aggregators.EncodedSumFactory.quantize_above_threshold(
            quantization_bits=b.quantization_bits,
            threshold=b.quantization_threshold,
            stochastic=b.quantization_rounding == "stochastic",
        )
        return _with_zeroing(spec, _with_clipping(spec, _mean(spec, quantized)))
    dp = tff.aggregators.DifferentiallyPrivateFactory
    if name == "dp_fixed":
        inner = dp.gaussian_fixed(
            noise_multiplier=b.noise_multiplier,
            clients_per_round=float(spec.clients_per_round),
            clip=b.dp_clip_norm,
        )
        return _with_zeroing(spec, inner)
    if name == "dp_adaptive":
        inner = dp.gaussian_adaptive(
            noise_multiplier=b.noise_multiplier,
            clients_per_round=float(spec.clients_per_round),
            initial_l2_norm_clip=b.dp_clip_norm,
            target_unclipped_quantile=b.dp_target_quantile,
            learning_rate=b.dp_clip_learning_rate,
        )
        return _with_zeroing(spec, inner)
    raise ValueError(f"aggregator {name!r} cannot be composed here")


def build(spec: AlgorithmSpec, update_type: tff.StructType) -> tff.templates.AggregationProcess:
    """The weighted aggregation process `compose_learning_process` wants."""
    f = factory(spec)
    if isinstance(f, tff.aggregators.WeightedAggregationFactory):
        return f.create(update_type, tff.TensorType(np.float32))
    # An unweighted factory ignores the clients' weights (as TFF's builders do).
    return tff.aggregators.as_weighted_aggregator(f).create(update_type, tff.TensorType(np.float32))


def empty_clients_harmless(spec: AlgorithmSpec) -> bool:
    """Whether clients with no examples change nothing the aggregator computes:
    an example-weighted mean, optionally with fixed-norm zeroing and clipping
    (a zero update is never zeroed nor clipped). Anything that counts clients
    is not."""
    b = spec.blocks
    if b.aggregator not in ("mean", "robust") or b.weighting != "examples":
        return False
    if b.aggregator == "robust":
        adaptive_zeroing = b.zeroing and not b.zeroing_norm > 0
        adaptive_clipping = b.clipping and not b.clipping_norm > 0
        return not (adaptive_zeroing or adaptive_clipping)
    return True
