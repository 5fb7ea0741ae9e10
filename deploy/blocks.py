"""`fedcompose blocks`: the four building blocks, their choices and parameters.

Everything shown comes from the settings' declarations (`shared.config`):
the choices of each block, which parameters each choice takes, and each
parameter's help and default, so the listing cannot drift from the flags.
"""

from __future__ import annotations

import dataclasses
import sys

from shared import config as config_lib
from shared import settings

DESCRIPTION = (
    "List the learning algorithm's four building blocks (distributor, client work, "
    "aggregator, finalizer), the choices for each, the TFF constructor behind each "
    "choice, and the settings (flags / [algorithm] keys) each one takes."
)

_TFF_NAMES = {
    ("distributor", "broadcast"): "tff.learning.templates.build_broadcast_process",
    ("client_work", "clipped"): "the tutorial's clipped client update (shared/client_update.py)",
    ("client_work", "model_delta"): "as tff.learning.templates.build_model_delta_client_work",
    ("aggregator", "mean"): "tff.aggregators.MeanFactory / UnweightedMeanFactory",
    (
        "aggregator",
        "robust",
    ): "zeroing_factory(clipping_factory(mean)) = tff.learning.robust_aggregator",
    (
        "aggregator",
        "compression",
    ): "EncodedSumFactory.quantize_above_threshold, as tff.learning.compression_aggregator",
    ("aggregator", "dp_fixed"): "tff.aggregators.DifferentiallyPrivateFactory.gaussian_fixed",
    (
        "aggregator",
        "dp_adaptive",
    ): "DifferentiallyPrivateFactory.gaussian_adaptive = tff.learning.dp_aggregator",
    ("aggregator", "secure"): "tff.learning.secure_aggregator: refused (see below)",
}
_OPTIMIZERS = {
    "sgd": "build_sgdm (no momentum)",
    "sgdm": "build_sgdm",
    "adam": "build_adam (server: FedAdam)",
    "yogi": "build_yogi (server: FedYogi)",
    "adagrad": "build_adagrad (server: FedAdagrad)",
}


def _fields() -> dict[str, dataclasses.Field]:
    fields = {f.name: f for f in dataclasses.fields(config_lib.AlgorithmConfig)}
    fields.update({f.name: f for f in dataclasses.fields(config_lib.TrainingConfig)})
    return fields


def _param(name: str, fields: dict[str, dataclasses.Field], indent: str = "      ") -> str:
    f = fields[name]
    default = settings.field_default(f)
    shown = settings._toml_value(default).strip('"')
    flag = settings.flag(name)
    if settings.kind_of(f) is bool:  # how to turn it off is part of the answer
        flag += f" / --no-{flag[2:]}"
    return f"{indent}{flag:<30} {f.metadata['help']} (default: {shown})"


def listing() -> str:
    fields = _fields()
    out = [
        "The algorithm is four blocks, joined by tff.learning.templates.compose_learning_process:",
        "Choose each with its flag or its key in the [algorithm] table of a config file.",
        "",
    ]

    out.append("distributor (--distributor)")
    for choice in config_lib.DISTRIBUTORS:
        out.append(f"  {choice:<14} {_TFF_NAMES[('distributor', choice)]}")

    out.append("")
    out.append("client work (--client-work)")
    for choice in config_lib.CLIENT_WORKS:
        out.append(f"  {choice:<14} {_TFF_NAMES[('client_work', choice)]}")
    out.append("  every client work takes:")
    for name in (
        "client_optimizer",
        "client_learning_rate",
        "proximal_mu",
        "local_epochs",
        "batch_size",
    ):
        out.append(_param(name, fields, "    "))
    out.append("  clipped also takes:")
    out.append(_param("clip_norm", fields, "    "))
    out.append("  client optimizers (tff.learning.optimizers) and their parameters:")
    for name, params in config_lib.OPTIMIZER_PARAMETERS.items():
        flags = ", ".join(settings.flag(f"client_{p}") for p in params) or "-"
        out.append(f"    {name:<10} {_OPTIMIZERS[name]:<36} {flags}")

    out.append("")
    out.append("aggregator (--aggregator)")
    described: list[str] = []
    for choice, params in config_lib.AGGREGATOR_PARAMETERS.items():
        out.append(f"  {choice:<14} {_TFF_NAMES[('aggregator', choice)]}")
        if choice in config_lib.REFUSED_AGGREGATORS:
            out.append(f"      refused: {config_lib.REFUSED_AGGREGATORS[choice]}")
        elif params:
            out.append("      takes " + ", ".join(settings.flag(p) for p in params))
        described += [p for p in params if p not in described]
    out.append("  aggregator parameters:")
    for name in described:
        out.append(_param(name, fields, "    "))

    out.append("")
    out.append("finalizer: tff.learning.templates.build_apply_optimizer_finalizer with")
    for name in ("server_optimizer", "server_learning_rate"):
        out.append(_param(name, fields, "    "))
    out.append("  server optimizers and their parameters:")
    for name, params in config_lib.OPTIMIZER_PARAMETERS.items():
        flags = ", ".join(settings.flag(f"server_{p}") for p in params) or "-"
        out.append(f"    {name:<10} {_OPTIMIZERS[name]:<36} {flags}")

    out.append("")
    out.append("what a run does with non-finite values:")
    out.append(_param("on_non_finite", fields, "    "))
    out.append("")
    out.append("Examples: FedProx  --client-work model_delta --proximal-mu 0.1")
    out.append("          FedAdam  --server-optimizer adam --server-learning-rate 0.03")
    out.append(
        "          DP-FedAvg  --aggregator dp_fixed --noise-multiplier 0.5 --dp-clip-norm 0.5"
    )
    return "\n".join(out)


def run(config: config_lib.RunConfig) -> int:
    del config
    print(listing(), file=sys.stdout)
    return 0
