"""Reading "stacked-tensors" client files inside a TensorFlow graph.

The TensorFlow side of `shared.tensor_records`: the header's size and every
section's dtype and shape follow from the element spec when the reader is
traced, so a client's dataset is built by one graph with no per-example
Python: `read_file`, `substr` for each section, `decode_raw`, reshape, and
`Dataset.from_tensor_slices` over the stacked leaves. A variable-length leaf
is sliced as (start, length) pairs, and one `map` (a graph function, no
Python) cuts each example's rows from the leaf's values into the dense
`[None, ...]` tensor the spec records; only datasets with such leaves have
it. (Slicing a RaggedTensor instead yields RaggedTensorSpec elements, and
tf.data cannot serialize an empty ragged tensor, which TFF must do for a
client without test examples.)
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import tensorflow as tf

from shared import element_spec, tensor_records
from shared.element_spec import STRING, ElementSpec, Leaf


def tf_dtype(leaf: Leaf) -> tf.DType:
    return tf.string if leaf.dtype == STRING else tf.as_dtype(leaf.dtype)


def to_tf(spec: ElementSpec) -> Any:
    """The `tf.TensorSpec` structure of one example (OrderedDicts and tuples)."""
    leaves = [tf.TensorSpec(leaf.shape, tf_dtype(leaf)) for _, leaf in element_spec.flatten(spec)]
    return element_spec.pack(spec, leaves)


def from_tf(spec: Any) -> ElementSpec:
    """The element spec of a `tf.data` element spec (TensorSpecs in dicts,
    tuples or lists); `SpecError` for what cannot be stored (ragged, sparse)."""
    if isinstance(spec, tf.TensorSpec):
        dtype = STRING if spec.dtype == tf.string else spec.dtype.as_numpy_dtype().dtype.name
        if spec.shape.rank is None:
            raise element_spec.SpecError(f"a tensor of unknown rank ({spec}) cannot be stored")
        return Leaf(dtype, tuple(spec.shape.as_list()))
    if isinstance(spec, dict):
        return collections.OrderedDict((str(k), from_tf(v)) for k, v in spec.items())
    if isinstance(spec, tuple | list):
        return tuple(from_tf(v) for v in spec)
    raise element_spec.SpecError(
        f"{type(spec).__name__} elements cannot be stored; make every field a dense tensor "
        "(a RaggedTensor of token ids becomes a [None] tensor per example)"
    )


def empty_file(spec: ElementSpec) -> bytes:
    """A file of no examples: what an empty client (padding) reads instead of a file."""
    columns: list[Any] = []
    for _, leaf in element_spec.flatten(spec):
        columns.append([] if leaf.variable else np.zeros((0, *leaf.inner_shape), leaf.numpy_dtype))
    return tensor_records.encode(spec, columns)


def _section(contents: tf.Tensor, table: tf.Tensor, i: int) -> tf.Tensor:
    return tf.strings.substr(contents, table[i, 0], table[i, 1])


def _leaf(contents: tf.Tensor, table: tf.Tensor, s: int, leaf: Leaf) -> tuple[tf.Tensor, Any, int]:
    """A leaf's values stacked over examples, its rows (None if fixed), next section."""
    rows = None
    if leaf.variable:
        rows = tf.io.decode_raw(_section(contents, table, s), tf.int64, little_endian=True)
        s += 1
    if leaf.dtype == STRING:
        lengths = tf.io.decode_raw(_section(contents, table, s), tf.int64, little_endian=True)
        blob = _section(contents, table, s + 1)
        starts = tf.cumsum(lengths, exclusive=True)
        values = tf.strings.substr(blob, starts, lengths)
        s += 2
    else:
        section = _section(contents, table, s)
        values = tf.io.decode_raw(section, tf_dtype(leaf), little_endian=True)
        s += 1
    return tf.reshape(values, [-1, *leaf.inner_shape]), rows, s


def stacked_examples(contents: tf.Tensor, spec: ElementSpec) -> tuple[Any, dict[int, tf.Tensor]]:
    """A file's leaves stacked over its examples, for `from_tensor_slices`: a
    fixed leaf as is, a variable leaf as its rows' (start, length) pairs, whose
    values are in the second result (by leaf index)."""
    header = tensor_records.header_bytes(spec)
    head = tf.io.decode_raw(tf.strings.substr(contents, 0, header), tf.int64, little_endian=True)
    table = tf.reshape(head[3:], [-1, 2])
    leaves: list[Any] = []
    variable: dict[int, tf.Tensor] = {}
    s = 0
    for i, (_, leaf) in enumerate(element_spec.flatten(spec)):
        values, rows, s = _leaf(contents, table, s, leaf)
        if rows is None:
            leaves.append(values)
        else:
            leaves.append(tf.stack([tf.cumsum(rows, exclusive=True), rows], axis=1))
            variable[i] = values
    return element_spec.pack(spec, leaves), variable


def client_examples(path: tf.Tensor, empty: tf.Tensor, spec: ElementSpec) -> tf.data.Dataset:
    """The examples of the file at `path` (nothing if `empty`), unbatched, in stored order."""
    contents = tf.cond(empty, lambda: tf.constant(empty_file(spec)), lambda: tf.io.read_file(path))
    stacked, variable = stacked_examples(contents, spec)
    ds = tf.data.Dataset.from_tensor_slices(stacked)
    if not variable:
        return ds

    # A ragged tensor cannot be sliced here: tf.data cannot serialize an empty
    # one (a client without test examples), and TFF serializes every dataset.
    # So each variable-length row is cut from its leaf's values by a graph map.
    def cut(*args: Any) -> Any:
        # A tuple element arrives as positional arguments, anything else as one.
        example = args if isinstance(spec, tuple) else args[0]
        flat = [value for _, value in element_spec.flatten_values(spec, example)]
        for i, values in variable.items():
            start, length = flat[i][0], flat[i][1]
            flat[i] = values[start : start + length]
        return element_spec.pack(spec, flat)

    return ds.map(cut)
