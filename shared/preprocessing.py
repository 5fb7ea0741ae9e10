"""Reading a client's examples as a batched `tf.data.Dataset`.

Runs inside TFF computations on the workers, so every path here is relative
to the worker's working directory and every input is a tensor. The same code
builds the reference datasets in tests, which is what makes distributed and
single-process runs comparable.
"""

from __future__ import annotations

import collections

import numpy as np
import tensorflow as tf

from shared import shard_format

SHARD_LINK = "shard"
"""Name under which a worker's working directory links to its shard."""

TOKEN_SEPARATOR = "|"


def element_spec() -> collections.OrderedDict:
    return collections.OrderedDict(
        x=tf.TensorSpec(shape=[None, shard_format.PIXELS], dtype=tf.float32),
        y=tf.TensorSpec(shape=[None, 1], dtype=tf.int32),
    )


def make_token(client_id: str, seed: int) -> str:
    """The string a worker turns into a client's dataset: id and shuffle seed."""
    return f"{client_id}{TOKEN_SEPARATOR}{seed}"


def _decode(record: tf.Tensor) -> collections.OrderedDict:
    pixels = tf.io.decode_raw(
        tf.strings.substr(record, 0, shard_format.PIXEL_BYTES), tf.float32, little_endian=True
    )
    label = tf.io.decode_raw(
        tf.strings.substr(record, shard_format.PIXEL_BYTES, 4), tf.int32, little_endian=True
    )
    # EMNIST stores ink as 0 on a background of 1; the models want ink high.
    return collections.OrderedDict(
        x=tf.reshape(1.0 - pixels, [shard_format.PIXELS]), y=tf.reshape(label, [1])
    )


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
    path = tf.strings.join([SHARD_LINK, "/", split, "/", client_id, ".bin"])
    ds = tf.data.FixedLengthRecordDataset(path, shard_format.RECORD_BYTES).map(_decode)
    if shuffle_buffer > 1:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if epochs > 1:
        ds = ds.repeat(epochs)
    return ds.batch(batch_size)


def batches_from_arrays(pixels: np.ndarray, labels: np.ndarray, batch_size: int):
    """The same preprocessing on in-memory arrays (for Keras baselines and tests)."""
    x = 1.0 - np.asarray(pixels, dtype=np.float32).reshape(-1, shard_format.PIXELS)
    y = np.asarray(labels, dtype=np.int32).reshape(-1, 1)
    return tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y)).batch(batch_size)
