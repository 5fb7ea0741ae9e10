"""The structure of one raw example, as a shard's manifest records it (no TensorFlow).

An element spec is what `tf.data.Dataset.element_spec` says of one unbatched
example, in a form JSON and numpy can hold:

- a leaf, `Leaf(dtype, shape)`: a numpy dtype name (`"uint8"`, `"int64"`,
  `"float32"`, ...) or `"string"` (bytes), and a shape whose dimensions are
  ints, or `None` for the first dimension only (a variable-length sequence:
  token ids `[None]`, a sentence's word vectors `[None, 300]`);
- a dict of named specs (kept in its given order, like TFF's OrderedDicts);
- a tuple of specs.

In the manifest (JSON) a leaf is `{"dtype": "uint8", "shape": [8, 8, 3]}`
(`null` for the unknown dimension), a dict is `{"dict": [[name, spec], ...]}`
(a list of pairs, so that the order survives any JSON reader) and a tuple is
`{"tuple": [spec, ...]}`.

Leaves have a fixed order, `flatten(spec)`: depth first, dict entries in their
given order. The shard encoding and the TensorFlow reader both go by it.
`describe(spec)` is the one-line form refusals show, e.g.
`{image: uint8[8,8,3], label: int64[]}`.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator
from typing import Any, Union

import numpy as np

from shared.errors import DataError

STRING = "string"
"""The dtype name of a bytes leaf (TensorFlow's tf.string)."""


class SpecError(DataError):
    """An element spec that fedcompose cannot record or read."""


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One tensor of an example: its dtype name and shape (`None`: variable first dim)."""

    dtype: str
    shape: tuple[int | None, ...]

    def __post_init__(self) -> None:
        if self.dtype != STRING:
            try:
                np.dtype(self.dtype)
            except TypeError:
                raise SpecError(f"unknown dtype {self.dtype!r} in an element spec") from None
            if np.dtype(self.dtype).kind not in "biuf":
                raise SpecError(
                    f"dtype {self.dtype!r} cannot be stored: use a bool, int, uint, float "
                    "or string tensor"
                )
        for i, d in enumerate(self.shape):
            if d is None and i > 0:
                raise SpecError(
                    f"shape {self.describe_shape()}: only the first dimension may be unknown "
                    "(a variable-length sequence); pad the inner dimensions to a fixed size"
                )
            if d is not None and (not isinstance(d, int) or d < 0):
                raise SpecError(f"shape {list(self.shape)}: dimensions must be ints >= 0")

    @property
    def variable(self) -> bool:
        """Whether examples differ in their first dimension."""
        return bool(self.shape) and self.shape[0] is None

    @property
    def inner_shape(self) -> tuple[int, ...]:
        """The shape after the variable first dimension (the whole shape if fixed)."""
        rest = self.shape[1:] if self.variable else self.shape
        # No None is left after the first dimension (__post_init__ refuses it).
        return tuple(d for d in rest if d is not None)

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(object) if self.dtype == STRING else np.dtype(self.dtype)

    def describe_shape(self) -> str:
        return "[" + ",".join("None" if d is None else str(d) for d in self.shape) + "]"

    def describe(self) -> str:
        return f"{self.dtype}{self.describe_shape()}"


ElementSpec = Union[Leaf, "collections.OrderedDict[str, ElementSpec]", tuple["ElementSpec", ...]]


def to_json(spec: ElementSpec) -> Any:
    """The manifest's JSON value for `spec`."""
    if isinstance(spec, Leaf):
        return {"dtype": spec.dtype, "shape": list(spec.shape)}
    if isinstance(spec, dict):
        return {"dict": [[name, to_json(s)] for name, s in spec.items()]}
    if isinstance(spec, tuple):
        return {"tuple": [to_json(s) for s in spec]}
    raise SpecError(f"not an element spec: {spec!r}")


def from_json(value: Any) -> ElementSpec:
    """The spec a manifest's JSON value holds; `SpecError` if malformed."""
    if not isinstance(value, dict) or len(value) not in (1, 2):
        raise SpecError(f"malformed element spec {value!r}")
    if "dtype" in value:
        shape = value.get("shape")
        if not isinstance(shape, list):
            raise SpecError(f"malformed element spec leaf {value!r}")
        return Leaf(str(value["dtype"]), tuple(shape))
    if "dict" in value and isinstance(value["dict"], list):
        out: collections.OrderedDict[str, ElementSpec] = collections.OrderedDict()
        for pair in value["dict"]:
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
                raise SpecError(f"malformed element spec entry {pair!r}")
            out[pair[0]] = from_json(pair[1])
        return out
    if "tuple" in value and isinstance(value["tuple"], list):
        return tuple(from_json(s) for s in value["tuple"])
    raise SpecError(f"malformed element spec {value!r}")


def flatten(spec: ElementSpec, prefix: str = "") -> Iterator[tuple[str, Leaf]]:
    """(path, leaf) in the fixed leaf order; paths join names and tuple indices with '/'."""
    if isinstance(spec, Leaf):
        yield prefix, spec
    elif isinstance(spec, dict):
        for name, s in spec.items():
            yield from flatten(s, f"{prefix}/{name}" if prefix else name)
    else:
        for i, s in enumerate(spec):
            yield from flatten(s, f"{prefix}/{i}" if prefix else str(i))


def flatten_values(spec: ElementSpec, value: Any) -> Iterator[tuple[str, Any]]:
    """(path, leaf value) of `value`, a nested structure shaped like `spec`."""
    if isinstance(spec, Leaf):
        yield "", value
    elif isinstance(spec, dict):
        for name, s in spec.items():
            yield from flatten_values(s, value[name])
    else:
        for i, s in enumerate(spec):
            yield from flatten_values(s, value[i])


def pack(spec: ElementSpec, leaves: list[Any]) -> Any:
    """`leaves` (in `flatten` order) put back into the structure of `spec`
    (OrderedDicts and tuples)."""
    it = iter(leaves)

    def build(s: ElementSpec) -> Any:
        if isinstance(s, Leaf):
            return next(it)
        if isinstance(s, dict):
            return collections.OrderedDict((k, build(v)) for k, v in s.items())
        return tuple(build(v) for v in s)

    out = build(spec)
    if next(it, None) is not None:
        raise SpecError("more values than the element spec has leaves")
    return out


def describe(spec: ElementSpec) -> str:
    """One line: `{image: uint8[8,8,3], label: int64[]}`."""
    if isinstance(spec, Leaf):
        return spec.describe()
    if isinstance(spec, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in spec.items()) + "}"
    return "(" + ", ".join(describe(v) for v in spec) + ")"


def leaf_at(spec: ElementSpec, path: str) -> Leaf:
    """The leaf at `path` (as `flatten` names it), or a one-line refusal."""
    for p, leaf in flatten(spec):
        if p == path:
            return leaf
    names = ", ".join(p for p, _ in flatten(spec))
    raise SpecError(f"no field {path!r} in the examples ({describe(spec)}); fields: {names}")


EMNIST_RAW: ElementSpec = collections.OrderedDict(
    label=Leaf("int32", ()),
    pixels=Leaf("float32", (28, 28)),
)
"""TFF's federated EMNIST element: what v1 (emnist-fixed) shards hold."""
