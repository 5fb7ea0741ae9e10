"""The "stacked-tensors" encoding: one client's split of any element spec in one file.

A client file (`<split>/<client_id>.tensors`) holds each leaf of the element
spec (`shared.element_spec`) stacked over the client's examples, in stored
order, so that a worker builds the client's dataset in one TensorFlow graph:
read the file, cut it into sections, `decode_raw` each, and
`Dataset.from_tensor_slices` (see `shared.tensor_reader`). No per-example
Python, and no per-example function for fixed-shape leaves.

Layout, all integers int64 little-endian::

    MAGIC (8 bytes)  num_examples  num_sections
    num_sections x (offset, length)          byte ranges from the file's start
    sections, in leaf order (element_spec.flatten), per leaf:
        fixed numeric    values            [n, *shape] in the leaf's dtype (little-endian)
        variable numeric row_lengths, values   row_lengths int64[n]; values [sum, *inner]
        fixed string     lengths, blob     lengths int64[n * prod(shape)]; the bytes, joined
        variable string  row_lengths, lengths, blob

The number of sections follows from the spec, so the header's size is known
when the reader is traced. The numpy side here writes and validates files;
it never needs TensorFlow.

Columns (what `encode` takes and `decode` returns, one per leaf in leaf
order): a fixed leaf is an array `[n, *shape]` (strings: an object array of
bytes); a variable leaf is a list of `n` arrays `[k_i, *inner]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from shared.element_spec import STRING, ElementSpec, Leaf, SpecError, flatten

ENCODING = "stacked-tensors"
SUFFIX = ".tensors"
MAGIC = b"FCTENS01"
Column = np.ndarray | list[np.ndarray]


def sections_of(leaf: Leaf) -> int:
    return 1 + int(leaf.variable) + int(leaf.dtype == STRING)


def header_bytes(spec: ElementSpec) -> int:
    """Size of a file's header for `spec` (magic, counts and the section table)."""
    sections = sum(sections_of(leaf) for _, leaf in flatten(spec))
    return 8 * 3 + 16 * sections


def num_examples(spec: ElementSpec, columns: Sequence[Column]) -> int:
    """How many examples `columns` hold (all leaves must agree)."""
    counts = {len(c) for c in columns}
    if len(counts) > 1:
        names = [p for p, _ in flatten(spec)]
        detail = ", ".join(f"{n}: {len(c)}" for n, c in zip(names, columns, strict=False))
        raise SpecError(f"fields hold different numbers of examples ({detail})")
    return counts.pop() if counts else 0


def _fixed_values(path: str, leaf: Leaf, column: Any, n: int) -> np.ndarray:
    array = np.asarray(column, dtype=leaf.numpy_dtype if leaf.dtype != STRING else object)
    if array.shape != (n, *leaf.inner_shape):
        raise SpecError(
            f"field {path!r}: {n} examples of shape {list(array.shape[1:])}, the spec says "
            f"{leaf.describe()}"
        )
    return array


def _string_sections(path: str, values: np.ndarray) -> list[bytes]:
    items = []
    for v in values.reshape(-1):
        if isinstance(v, str):
            v = v.encode()
        if not isinstance(v, bytes | np.bytes_):
            raise SpecError(f"field {path!r}: a string leaf holds {type(v).__name__}")
        items.append(bytes(v))
    lengths = np.array([len(b) for b in items], dtype="<i8")
    return [lengths.tobytes(), b"".join(items)]


def _leaf_sections(path: str, leaf: Leaf, column: Any, n: int) -> list[bytes]:
    out: list[bytes] = []
    if leaf.variable:
        rows = []
        for i, row in enumerate(column):
            row = np.asarray(row, dtype=leaf.numpy_dtype if leaf.dtype != STRING else object)
            if row.ndim != len(leaf.shape) or tuple(row.shape[1:]) != leaf.inner_shape:
                raise SpecError(
                    f"field {path!r}: example {i} has shape {list(row.shape)}, the spec says "
                    f"{leaf.describe()}"
                )
            rows.append(row)
        out.append(np.array([len(r) for r in rows], dtype="<i8").tobytes())
        empty = np.zeros((0, *leaf.inner_shape), dtype=leaf.numpy_dtype)
        values = np.concatenate(rows) if rows else empty
    else:
        values = _fixed_values(path, leaf, column, n)
    if leaf.dtype == STRING:
        return out + _string_sections(path, values)
    little = values.astype(np.dtype(leaf.dtype).newbyteorder("<"), copy=False)
    return [*out, np.ascontiguousarray(little).tobytes()]


def encode(spec: ElementSpec, columns: Sequence[Column]) -> bytes:
    """One client's split as a file; `SpecError` if a column does not fit its leaf."""
    leaves = list(flatten(spec))
    if len(columns) != len(leaves):
        raise SpecError(f"{len(columns)} columns for {len(leaves)} fields of the element spec")
    n = num_examples(spec, columns)
    sections: list[bytes] = []
    for (path, leaf), column in zip(leaves, columns, strict=True):
        sections.extend(_leaf_sections(path, leaf, column, n))
    table = np.zeros((len(sections), 2), dtype="<i8")
    offset = header_bytes(spec)
    for i, s in enumerate(sections):
        table[i] = (offset, len(s))
        offset += len(s)
    head = MAGIC + np.array([n, len(sections)], dtype="<i8").tobytes() + table.tobytes()
    return head + b"".join(sections)


class FormatError(ValueError):
    """A file that does not decode under the element spec (message without origin)."""


def _table(data: bytes, spec: ElementSpec, size: int | None = None) -> tuple[int, np.ndarray]:
    """The example count and section table of a file of `size` bytes whose
    start is `data` (all of it unless `size` is given)."""
    size = len(data) if size is None else size
    want = sum(sections_of(leaf) for _, leaf in flatten(spec))
    if len(data) < header_bytes(spec) or data[:8] != MAGIC:
        raise FormatError("not a stacked-tensors file (no header; truncated or another format)")
    n, count = (int(v) for v in np.frombuffer(data, "<i8", 2, 8))
    if count != want:
        raise FormatError(
            f"{count} sections, the element spec needs {want}: written for another element spec"
        )
    table = np.frombuffer(data, "<i8", 2 * count, 24).reshape(count, 2)
    ends = table.sum(axis=1)
    if n < 0 or (table < 0).any() or (ends > size).any():
        raise FormatError(f"section table points past the file's {size} bytes; truncated")
    if count and int(ends.max()) != size:
        raise FormatError(f"{size} bytes, the header says {int(ends.max())}; stale or damaged")
    return n, table


def check_header(head: bytes, spec: ElementSpec, size: int) -> int:
    """The example count of a file of `size` bytes from its header alone
    (`FormatError` if the header does not fit the spec or the size)."""
    return _table(head, spec, size)[0]


def _numbers(data: bytes, where: np.ndarray, dtype: str, count: int, what: str) -> np.ndarray:
    start, length = (int(v) for v in where)
    itemsize = np.dtype(dtype).itemsize
    if length != count * itemsize:
        raise FormatError(f"{what}: {length} bytes, expected {count * itemsize}")
    return np.frombuffer(data, np.dtype(dtype).newbyteorder("<"), count, start)


def _strings(data: bytes, lengths: np.ndarray, where: np.ndarray, what: str) -> np.ndarray:
    start, length = (int(v) for v in where)
    if (lengths < 0).any() or int(lengths.sum()) != length:
        raise FormatError(f"{what}: string lengths do not add up to the {length} bytes stored")
    ends = np.cumsum(lengths) + start
    out = np.empty(len(lengths), dtype=object)
    for i, (e, k) in enumerate(zip(ends, lengths, strict=True)):
        out[i] = data[int(e - k) : int(e)]
    return out


def decode(data: bytes, spec: ElementSpec) -> tuple[int, list[Column]]:
    """The number of examples and the columns of a file; `FormatError` if malformed."""
    n, table = _table(data, spec)
    columns: list[Column] = []
    s = 0
    for path, leaf in flatten(spec):
        rows = None
        if leaf.variable:
            rows = _numbers(data, table[s], "int64", n, f"field {path!r} row lengths")
            if (rows < 0).any():
                raise FormatError(f"field {path!r}: negative row length")
            s += 1
        count = (int(rows.sum()) if rows is not None else n) * int(np.prod(leaf.inner_shape))
        if leaf.dtype == STRING:
            lengths = _numbers(data, table[s], "int64", count, f"field {path!r} lengths")
            values = _strings(data, lengths, table[s + 1], f"field {path!r}")
            s += 2
        else:
            values = _numbers(data, table[s], leaf.dtype, count, f"field {path!r}")
            s += 1
        values = values.reshape(-1, *leaf.inner_shape)
        if rows is None:
            columns.append(values)
        else:
            columns.append(np.split(values, np.cumsum(rows)[:-1]) if n else [])
    return n, columns
