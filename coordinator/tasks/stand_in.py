"""Small generated datasets with a real task's element spec.

The real files (TFF's SQLite databases) are not on every machine; a stand-in
lets a fresh clone train each task end to end. It is tiny, deterministic
(a fixed seed: `fedcompose data` and the coordinator make the same one) and
learnable (each label or next token depends on the example), so a few rounds
visibly lower the loss. It is no benchmark: only the element spec is real.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

ClientData: TypeAlias = Any
"""A `tff.simulation.datasets.ClientData` (TFF ships no type information)."""
ClientSpec: TypeAlias = Any
"""A `tff.simulation.baselines.ClientSpec`."""
BaselineTask: TypeAlias = Any
"""A `tff.simulation.baselines.BaselineTask`."""

SEED = 20
"""The stand-ins' one seed: the data is a fixed function of the task."""
CLIENTS = 4
"""Clients of each stand-in: two per worker of a two-worker federation."""

Examples = Mapping[str, np.ndarray]
MakeClient = Callable[[np.random.Generator, int, int], Examples]
"""(rng, client index, number of examples) -> one client's examples, by key."""


def client_data(
    spec: Mapping[str, tf.TensorSpec],
    make: MakeClient,
    examples: int,
    clients: int = CLIENTS,
    seed: int = SEED,
) -> ClientData:
    """A ClientData of `clients` clients of `examples` examples each, made by
    `make` and checked against `spec` (keys, dtypes, shapes)."""
    rng = np.random.default_rng(seed)
    per_client = {}
    for index in range(clients):
        made = make(rng, index, examples)
        arrays = collections.OrderedDict()
        for key, leaf in spec.items():
            value = np.asarray(made[key], dtype=leaf.dtype.as_numpy_dtype)
            expected = (examples, *leaf.shape)
            assert value.shape == expected, (key, value.shape, expected)
            arrays[key] = value
        per_client[f"{index:03d}"] = arrays
    data = tff.simulation.datasets.TestClientData(per_client)
    assert data.element_type_structure == spec, (data.element_type_structure, spec)
    return data


def train_and_test(
    spec: Mapping[str, tf.TensorSpec], make: MakeClient, train_examples: int, test_examples: int
) -> tuple[ClientData, ClientData]:
    """The same clients' train and test splits (test drawn after train)."""
    return (
        client_data(spec, make, train_examples),
        client_data(spec, make, test_examples, seed=SEED + 1),
    )
