"""Computations prepared once for TFF's C++ runtime, and their values serialized.

A computation is compiled for the native runtime and serialized once; its
arguments and results go through TFF's own value serialization, except the
client tokens of a round, which are serialized directly (TFF type-checks
every element; a round of 1,000 clients spent 0.1 s there).
"""

from __future__ import annotations

import base64
import collections
import functools
import importlib
import itertools
import json
import sys
from collections.abc import Sequence

import numpy as np
import tensorflow_federated as tff
from tensorflow_federated.proto.v0 import computation_pb2, executor_pb2
from tensorflow_federated.python.common_libs import structure
from tensorflow_federated.python.core.impl.executors import value_serialization
from tensorflow_federated.python.core.impl.types import (
    placements,
    type_conversions,
    type_serialization,
)

_ids = itertools.count()


class PreparedComputation:
    """A computation compiled for the native C++ runtime and serialized once."""

    def __init__(self, comp: tff.Computation, name: str):
        compiled = tff.backends.native.desugar_and_transform_to_native(comp)
        value_proto, _ = value_serialization.serialize_value(compiled, compiled.type_signature)
        self._set(name, value_proto, compiled.type_signature.parameter, comp.type_signature.result)

    def _set(
        self,
        name: str,
        value_proto: executor_pb2.Value,
        parameter_type: tff.Type | None,
        result_type: tff.Type,
    ) -> None:
        self.name = name
        self.key = next(_ids)
        self.value_proto = value_proto
        self.parameter_type = parameter_type
        self.result_type = result_type

    def to_bytes(self) -> dict[str, bytes]:
        """What `from_bytes` takes back: the serialized computation and its types."""
        parts = {
            "value": self.value_proto.SerializeToString(),
            "result": json.dumps(type_to_data(self.result_type)).encode(),
        }
        if self.parameter_type is not None:
            parts["parameter"] = json.dumps(type_to_data(self.parameter_type)).encode()
        return parts

    @classmethod
    def from_bytes(cls, name: str, parts: dict[str, bytes]) -> PreparedComputation:
        """The computation `to_bytes` gave, without compiling anything."""
        prepared = cls.__new__(cls)
        parameter = parts.get("parameter")
        prepared._set(
            name,
            executor_pb2.Value.FromString(parts["value"]),
            type_from_data(json.loads(parameter)) if parameter is not None else None,
            type_from_data(json.loads(parts["result"])),
        )
        return prepared

    def serialize_arg(self, arg: object) -> executor_pb2.Value:
        arg = tff.tensorflow.transform_args(arg)
        proto, _ = value_serialization.serialize_value(arg, self.parameter_type)
        return proto

    def serialize_element(self, index: int, value: object) -> executor_pb2.Value:
        """One element of a struct parameter, serialized on its own."""
        if self.parameter_type is None:
            raise ValueError(f"{self.name} takes no argument, so has no element {index}")
        element_type = self.parameter_type[index]
        if is_strings_at_clients(element_type) and isinstance(value, list | tuple):
            return serialize_strings_at_clients(value, element_type)
        value = tff.tensorflow.transform_args(value)
        proto, _ = value_serialization.serialize_value(value, element_type)
        return proto

    def struct_arg(self, elements: Sequence[executor_pb2.Value]) -> executor_pb2.Value:
        """The struct parameter from its elements' serialized values.

        Lets a caller serialize a large element (the server state) once and
        send it with a different small element (the clients) to each worker.
        """
        names = element_names(self.parameter_type)
        if len(names) != len(elements):
            raise ValueError(f"{self.name} takes {len(names)} arguments, got {len(elements)}")
        arg = executor_pb2.Value()
        for name, value in zip(names, elements, strict=True):
            # One copy; nested constructors would copy the state once per level.
            arg.struct.element.add(name=name).value.CopyFrom(value)
        return arg

    def deserialize_result(self, proto: executor_pb2.Value) -> object:
        value, _ = value_serialization.deserialize_value(proto, self.result_type)
        value = type_conversions.type_to_py_container(value, self.result_type)
        return tff.tensorflow.transform_result(value)


def is_strings_at_clients(type_spec: object) -> bool:
    """Whether `type_spec` is `{str}@CLIENTS`, the type of a round's client tokens."""
    return (
        isinstance(type_spec, tff.FederatedType)
        and type_spec.placement is tff.CLIENTS
        and not type_spec.all_equal
        and isinstance(type_spec.member, tff.TensorType)
        and type_spec.member.dtype.type is np.str_
        and not type_spec.member.shape
    )


def serialize_strings_at_clients(
    values: Sequence[str], type_spec: tff.FederatedType
) -> executor_pb2.Value:
    """What `value_serialization.serialize_value(values, type_spec)` makes for a
    `{str}@CLIENTS` type, in a few microseconds per string instead of about 0.1 ms
    (TFF type-checks and traces every element; a round of 1,000 clients spent
    0.1 s there)."""
    header, member = _strings_at_clients_template(type_spec)
    proto = executor_pb2.Value()
    proto.CopyFrom(header)
    elements = proto.federated.value
    for value in values:
        element = elements.add()
        element.CopyFrom(member)
        element.array.string_list.value[0] = value.encode()
    return proto


@functools.cache
def _strings_at_clients_template(
    type_spec: tff.FederatedType,
) -> tuple[executor_pb2.Value, executor_pb2.Value]:
    """TFF's own serialization of no strings, and of one string's element."""
    header, _ = value_serialization.serialize_value([], type_spec)
    one, _ = value_serialization.serialize_value([""], type_spec)
    return header, one.federated.value[0]


def element_names(struct_type: tff.StructType) -> list[str]:
    """The element names of a struct type, '' for unnamed ones."""
    return [name or "" for name, _ in structure.iter_elements(struct_type)]


# TFF's type protos drop the Python containers (OrderedDict, ModelWeights,
# LearningProcessOutput, ...) that results are rebuilt into, so types are kept
# as data that names them; only classes of TFF, TF Privacy and dp-accounting (DP states),
# fedcompose and the standard containers are taken back.
_CONTAINER_MODULES = {"collections", "builtins"}
_CONTAINER_PACKAGES = (
    "tensorflow_federated.",
    "tensorflow_privacy.",
    "dp_accounting.",
    "coordinator.",
    "shared.",
)


def type_to_data(type_spec: tff.Type) -> dict:
    """`type_spec` as JSON-able data that `type_from_data` takes back whole."""
    if isinstance(type_spec, tff.StructType):
        data: dict = {
            "struct": [[name, type_to_data(t)] for name, t in structure.iter_elements(type_spec)]
        }
        container = getattr(type_spec, "python_container", None)
        if container is not None:
            path = _path_to(container)
            if path is None and _is_namedtuple(container):
                # Made at run time (dp-accounting's events): its like, by shape.
                data["namedtuple"] = [container.__name__, list(container._fields)]
            else:
                data["container"] = f"{container.__module__}:{path or container.__qualname__}"
        return data
    if isinstance(type_spec, tff.FederatedType):
        return {
            "federated": type_to_data(type_spec.member),
            "placement": type_spec.placement.uri,
            "all_equal": type_spec.all_equal,
        }
    if isinstance(type_spec, tff.SequenceType):
        return {"sequence": type_to_data(type_spec.element)}
    if isinstance(type_spec, tff.FunctionType):
        parameter = type_spec.parameter
        return {
            "function": [
                None if parameter is None else type_to_data(parameter),
                type_to_data(type_spec.result),
            ]
        }
    proto = type_serialization.serialize_type(type_spec).SerializeToString()
    return {"proto": base64.b64encode(proto).decode()}


def _is_namedtuple(cls: type) -> bool:
    return issubclass(cls, tuple) and isinstance(getattr(cls, "_fields", None), tuple)


@functools.cache
def _namedtuple(name: str, fields: tuple[str, ...]) -> type:
    return collections.namedtuple(name, fields)


def _path_to(cls: type) -> str | None:
    """The attribute path from `cls`'s module to `cls`: its qualified name, or for
    a namedtuple made in a class body (TF Privacy's query states), `Outer.Name`."""
    module = sys.modules.get(cls.__module__)

    def resolves(path: str) -> bool:
        value: object = module
        for attr in path.split("."):
            value = getattr(value, attr, None)
        return value is cls

    if module is None or resolves(cls.__qualname__):
        return cls.__qualname__
    for outer_name, outer in vars(module).items():
        if isinstance(outer, type) and vars(outer).get(cls.__name__) is cls:
            return f"{outer_name}.{cls.__name__}"
    return None


def _container(name: str) -> type:
    module_name, _, qualname = name.partition(":")
    if not (module_name in _CONTAINER_MODULES or module_name.startswith(_CONTAINER_PACKAGES)):
        raise ValueError(
            f"container {name} is not one TFF, TF Privacy, dp-accounting or fedcompose defines"
        )
    value: object = importlib.import_module(module_name)
    for attr in qualname.split("."):
        value = getattr(value, attr)
    if not isinstance(value, type):
        raise ValueError(f"container {name} is not a class")
    return value


def type_from_data(data: dict) -> tff.Type:
    if "struct" in data:
        elements = [(name, type_from_data(t)) for name, t in data["struct"]]
        if "container" in data:
            return tff.types.StructWithPythonType(elements, _container(data["container"]))
        if "namedtuple" in data:
            name, fields = data["namedtuple"]
            return tff.types.StructWithPythonType(elements, _namedtuple(name, tuple(fields)))
        return tff.StructType(elements)
    if "federated" in data:
        placement = placements.uri_to_placement_literal(data["placement"])
        return tff.FederatedType(type_from_data(data["federated"]), placement, data["all_equal"])
    if "sequence" in data:
        return tff.SequenceType(type_from_data(data["sequence"]))
    if "function" in data:
        parameter, result = data["function"]
        return tff.FunctionType(
            None if parameter is None else type_from_data(parameter), type_from_data(result)
        )
    proto = computation_pb2.Type.FromString(base64.b64decode(data["proto"]))
    return type_serialization.deserialize_type(proto)
