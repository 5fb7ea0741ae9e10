"""The coordinator's fast serialization of client tokens equals TFF's own."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_federated as tff
from tensorflow_federated.python.core.impl.executors import value_serialization

from coordinator.executor_client import computations as remote

CLIENT_STRINGS = tff.FederatedType(np.str_, tff.CLIENTS)


@pytest.mark.parametrize(
    "tokens", [[], ["writer_0001|7"], [f"synth_{i:05d}|3" for i in range(300)] + ["|0"]]
)
def test_client_tokens_serialize_exactly_as_tff_does(tokens):
    ours = remote.serialize_strings_at_clients(tokens, CLIENT_STRINGS)
    theirs, _ = value_serialization.serialize_value(tokens, CLIENT_STRINGS)
    assert ours == theirs
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(
        deterministic=True
    )


def test_only_client_strings_take_the_fast_path():
    assert remote.is_strings_at_clients(CLIENT_STRINGS)
    assert not remote.is_strings_at_clients(tff.FederatedType(np.str_, tff.SERVER))
    assert not remote.is_strings_at_clients(tff.FederatedType(np.int32, tff.CLIENTS))
    assert not remote.is_strings_at_clients(tff.FederatedType(np.str_, tff.CLIENTS, all_equal=True))
    assert not remote.is_strings_at_clients(tff.TensorType(np.str_))
