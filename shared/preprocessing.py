"""Reading a client's examples as a batched `tf.data.Dataset`.

Runs inside TFF computations on the workers, so every path here is relative
to the worker's working directory and every input is a tensor. The same code
builds the reference datasets in tests, which is what makes distributed and
single-process runs comparable.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import tensorflow as tf

from shared import shard_format, tensor_reader, worker_dir

TOKEN_SEPARATOR = "|"

EMPTY_CLIENT_TOKEN = f"{TOKEN_SEPARATOR}0"
"""A client without examples (its id is empty, which no real client's can be).

The coordinator pads a worker's clients with it up to a count the worker has
already served: the worker then reuses the executor it built for that count
instead of building one for a new count. An empty client's update has weight
zero and its metrics are zero, so it changes no sum.
"""


def element_spec() -> collections.OrderedDict:
    return collections.OrderedDict(
        x=tf.TensorSpec(shape=[None, shard_format.PIXELS], dtype=tf.float32),
        y=tf.TensorSpec(shape=[None, 1], dtype=tf.int32),
    )


def make_token(client_id: str, seed: int) -> str:
    """The string a worker turns into a client's dataset: id and shuffle seed."""
    return f"{client_id}{TOKEN_SEPARATOR}{seed}"


def _read_client_file(path: tf.Tensor, empty: tf.Tensor) -> collections.OrderedDict:
    """All of a client's examples as model inputs, decoded in the graph.

    Reading the whole (small) file and slicing it keeps the dataset free of
    per-example functions, which the executor would otherwise instantiate
    anew for every client in every round. An `empty` client reads nothing.
    """
    raw = tf.cond(
        empty,
        lambda: tf.zeros([0], tf.uint8),
        lambda: tf.io.decode_raw(tf.io.read_file(path), tf.uint8),
    )
    records = tf.reshape(raw, [-1, shard_format.RECORD_BYTES])
    pixel_bytes = tf.reshape(records[:, : shard_format.PIXEL_BYTES], [-1, shard_format.PIXELS, 4])
    # bitcast reads host byte order; the format is little-endian, as are the
    # x86-64 and ARM machines TF runs on.
    pixels = tf.bitcast(pixel_bytes, tf.float32)
    labels = tf.bitcast(records[:, shard_format.PIXEL_BYTES :], tf.int32)
    # EMNIST stores ink as 0 on a background of 1; the models want ink high.
    return collections.OrderedDict(x=1.0 - pixels, y=tf.reshape(labels, [-1, 1]))


def raw_element_spec(data: shard_format.DataFormat | None = None) -> Any:
    """One example as `raw_client_dataset` yields it (TensorSpecs in the
    recorded structure). Without `data`: TFF's federated EMNIST element
    (`tff.simulation.datasets.emnist`), what emnist-fixed shards hold, so code
    written for that ClientData preprocesses the workers' data unchanged."""
    if data is None or data.encoding == shard_format.EMNIST_FIXED:
        return collections.OrderedDict(
            label=tf.TensorSpec(shape=[], dtype=tf.int32),
            pixels=tf.TensorSpec(shape=list(shard_format.IMAGE_SHAPE), dtype=tf.float32),
        )
    return tensor_reader.to_tf(data.spec)


def raw_client_dataset(
    token: tf.Tensor, split: str, data: shard_format.DataFormat | None = None
) -> tf.data.Dataset:
    """A client's split as stored (unbatched, in file order, elements exactly
    `raw_element_spec(data)`), read relative to the cwd: what a user's
    preprocessing takes. `data` is the shards' format (the manifest's
    `DataFormat`); None: emnist-fixed (ink 0 on a background of 1)."""
    data = data or shard_format.EMNIST_FORMAT
    client_id = tf.strings.split(token, sep=TOKEN_SEPARATOR)[0]
    path = tf.strings.join([worker_dir.split_dir(split), "/", client_id, data.suffix])
    if data.encoding == shard_format.STACKED_TENSORS:
        ds = tensor_reader.client_examples(path, tf.equal(client_id, ""), data.spec)
        return ds.with_options(_lean_options())
    raw = tf.cond(
        tf.equal(client_id, ""),
        lambda: tf.zeros([0], tf.uint8),
        lambda: tf.io.decode_raw(tf.io.read_file(path), tf.uint8),
    )
    records = tf.reshape(raw, [-1, shard_format.RECORD_BYTES])
    pixel_bytes = tf.reshape(records[:, : shard_format.PIXEL_BYTES], [-1, shard_format.PIXELS, 4])
    pixels = tf.reshape(tf.bitcast(pixel_bytes, tf.float32), [-1, *shard_format.IMAGE_SHAPE])
    labels = tf.reshape(tf.bitcast(records[:, shard_format.PIXEL_BYTES :], tf.int32), [-1])
    examples = collections.OrderedDict(label=labels, pixels=pixels)
    return tf.data.Dataset.from_tensor_slices(examples).with_options(_lean_options())


def client_dataset(
    token: tf.Tensor,
    split: str,
    batch_size: int,
    epochs: int = 1,
    shuffle_buffer: int = 0,
) -> tf.data.Dataset:
    """A client's split, preprocessed and batched, read relative to the cwd."""
    parts = tf.strings.split(token, sep=TOKEN_SEPARATOR)
    client_id = parts[0]
    seed = tf.strings.to_number(parts[1], out_type=tf.int64)
    path = tf.strings.join(
        [worker_dir.split_dir(split), "/", client_id, shard_format.CLIENT_SUFFIX]
    )
    ds = tf.data.Dataset.from_tensor_slices(_read_client_file(path, tf.equal(client_id, "")))
    if shuffle_buffer > 1:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if epochs > 1:
        ds = ds.repeat(epochs)
    return ds.batch(batch_size).with_options(_lean_options())


def _lean_options() -> tf.data.Options:
    # Each client's pipeline is built, run once and dropped, inside a worker
    # that serves many clients per round: tf.data's graph rewrites and
    # autotuning cost more per client than they save on a few small batches.
    options = tf.data.Options()
    options.experimental_optimization.apply_default_optimizations = False
    options.autotune.enabled = False
    options.threading.private_threadpool_size = 1
    return options


def batches_from_arrays(pixels: np.ndarray, labels: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """The same preprocessing on in-memory arrays (for Keras baselines and tests)."""
    x = 1.0 - np.asarray(pixels, dtype=np.float32).reshape(-1, shard_format.PIXELS)
    y = np.asarray(labels, dtype=np.int32).reshape(-1, 1)
    return tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y)).batch(batch_size)
