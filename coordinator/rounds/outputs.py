"""What a round's or an evaluation's output says, as the plain figures the
run directory records.

fedcompose's own blocks report their metrics in known places (the clipped
client work's loss, accuracy, examples and dropped clients; the finalizer's
`update_non_finite`). A process a user composed reports whatever its blocks
measure: the same figures are looked up where TFF's own blocks put them, a
figure that is not there is None, and every number the process measured is
kept, flattened, under `measurements`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import numpy as np

ACCURACY_NAMES = ("accuracy", "sparse_categorical_accuracy", "categorical_accuracy")
"""What TFF's and Keras's accuracy metrics are called."""


def scalars(measurements: object, prefix: str = "") -> dict[str, float]:
    """A block's measurements as flat `name/sub: number` pairs, for the metrics."""
    out: dict[str, float] = {}
    items = measurements.items() if isinstance(measurements, Mapping) else ()
    if not items and hasattr(measurements, "_asdict"):  # a named tuple (ModelWeights, ...)
        items = measurements._asdict().items()
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) or hasattr(value, "_asdict"):
            out.update(scalars(value, name + "/"))
        elif np.ndim(value) == 0 and _numeric(np.asarray(value).dtype):
            out[name] = float(value)
    return out


def _numeric(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.number) or dtype == np.bool_


def _find(flat: dict[str, float], *names: str) -> float | None:
    for name in names:
        if name in flat:
            return flat[name]
    return None


def _accuracy(flat: dict[str, float], prefix: str) -> float | None:
    return _find(flat, *(f"{prefix}{name}" for name in ACCURACY_NAMES))


def train_metrics(metrics: object, user_defined: bool) -> dict:
    """The round's train figures (`loss`, `accuracy`, `examples`, ...)."""
    if not user_defined:
        # fedcompose's own blocks: nested mappings of these names, by construction.
        own = cast(Mapping[str, Any], metrics)
        m = own["client_work"]["train"]
        return {
            # Over the clients whose update was finite; none (all dropped): no figure.
            "loss": float(m["loss"]) if m["num_examples"] else None,
            "accuracy": float(m["accuracy"]) if m["num_examples"] else None,
            "examples": int(m["num_examples"]),
            "update_non_finite": int(own["finalizer"]["update_non_finite"]),
            "dropped_clients": int(m["dropped_clients"]),
            "dropped_examples": int(m["dropped_examples"]),
            "aggregator": scalars(own["aggregator"]),
        }
    flat = scalars(metrics)
    examples = _find(flat, "client_work/train/num_examples", "client_work/num_examples")
    loss = _find(flat, "client_work/train/loss", "client_work/loss")
    accuracy = _accuracy(flat, "client_work/train/")
    if accuracy is None:
        accuracy = _accuracy(flat, "client_work/")
    non_finite = _find(flat, "finalizer/update_non_finite")
    return {
        "loss": loss if examples != 0 else None,
        "accuracy": accuracy if examples != 0 else None,
        "examples": int(examples) if examples is not None else None,
        "update_non_finite": int(non_finite) if non_finite is not None else 0,
        "measurements": flat,
    }


def eval_metrics(metrics: object) -> dict:
    """Held-out figures from TFF's federated evaluation (`build_fed_eval`)."""
    flat = scalars(metrics)
    prefix = "client_work/eval/current_round_metrics/"
    examples = flat.get(f"{prefix}num_examples")
    return {
        "loss": flat[f"{prefix}loss"],
        "accuracy": _accuracy(flat, prefix),
        "examples": int(examples) if examples is not None else None,
    }


def weight_lists(weights: object) -> tuple[list, list]:
    """(trainable, non-trainable) arrays of what a process's `get_model_weights`
    returns: TFF's ModelWeights, or any structure of tensors (k-means' centroids),
    taken as trainable."""
    import tensorflow as tf

    if hasattr(weights, "trainable") and hasattr(weights, "non_trainable"):
        return list(weights.trainable), list(weights.non_trainable)
    if isinstance(weights, Mapping) and set(weights) == {"trainable", "non_trainable"}:
        return list(weights["trainable"]), list(weights["non_trainable"])
    return [np.asarray(leaf) for leaf in tf.nest.flatten(weights)], []


def weight_arrays(weights: object) -> dict[str, np.ndarray]:
    """The weights as the named arrays a weights `.npz` holds (`trainable_0`, ...,
    `non_trainable_0`, ...): the run directory's final model, the TFF reference's."""
    trainable, non_trainable = weight_lists(weights)
    arrays = {f"trainable_{i}": np.asarray(w) for i, w in enumerate(trainable)}
    arrays.update({f"non_trainable_{i}": np.asarray(w) for i, w in enumerate(non_trainable)})
    return arrays


def weights_from_arrays(saved: Mapping[str, np.ndarray]) -> tuple[list, list]:
    """(trainable, non-trainable) back from `weight_arrays`' names."""

    def part(prefix: str) -> list:
        count = sum(1 for n in saved if n.startswith(prefix) and n[len(prefix) :].isdigit())
        return [saved[f"{prefix}{i}"] for i in range(count)]

    return part("trainable_"), part("non_trainable_")
