"""Checks a shard before a worker serves it.

A bad shard must stop the worker at start with one line naming the file and
the problem, not fail a training round later on some other machine.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from shared import element_spec, shard_format, tensor_records
from shared.shard_format import ShardError


def check_shard(shard_dir: Path, deep: bool = True) -> shard_format.Manifest:
    """Returns the shard's manifest; raises `ShardError` on the first problem.

    `deep` also reads every example: checksum, decoding under the recorded
    element spec, pixel range (emnist-fixed) and label range.
    """
    if not shard_dir.exists():
        raise ShardError(f"{shard_dir}: no such directory")
    if not shard_dir.is_dir():
        raise ShardError(f"{shard_dir}: not a directory")
    manifest = shard_format.read_manifest(shard_dir)
    if not manifest.clients:
        raise ShardError(f"{shard_dir / shard_format.MANIFEST_NAME}: the shard has no clients")
    try:
        shard_format.check_client_ids(c.id for c in manifest.clients)
    except ShardError as e:
        raise ShardError(f"{shard_dir / shard_format.MANIFEST_NAME}: {e}") from None
    ids = [c.id for c in manifest.clients]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ShardError(f"{shard_dir / shard_format.MANIFEST_NAME}: client {dup!r} listed twice")
    _check_format(shard_dir, manifest)
    for client in manifest.clients:
        if client.train_examples <= 0:
            raise ShardError(
                f"{shard_dir / shard_format.client_path('train', client.id, manifest.data)}: "
                f"client {client.id!r} has no training examples"
            )
        for split in shard_format.SPLITS:
            if manifest.data.encoding == shard_format.STACKED_TENSORS:
                _check_tensor_file(shard_dir, manifest, client, split, deep)
            else:
                _check_client_file(shard_dir, manifest, client, split, deep)
    return manifest


def _check_format(shard_dir: Path, manifest: shard_format.Manifest) -> None:
    """The manifest's task against its data format."""
    where = shard_dir / shard_format.MANIFEST_NAME
    data = manifest.data
    if data.encoding == shard_format.STACKED_TENSORS:
        if data.label_key is not None:
            try:
                leaf = element_spec.leaf_at(data.spec, data.label_key)
            except element_spec.SpecError as e:
                raise ShardError(f"{where}: label_key: {e}") from None
            if leaf.shape != () or leaf.dtype == element_spec.STRING or leaf.dtype[0] not in "iu":
                raise ShardError(
                    f"{where}: label {data.label_key!r} is {leaf.describe()}, not an integer scalar"
                )
        return
    if data != shard_format.EMNIST_FORMAT:
        raise ShardError(
            f"{where}: an emnist-fixed shard must record TFF-EMNIST's element spec "
            f"{shard_format.EMNIST_FORMAT.describe()}, this one records {data.describe()}"
        )
    if tuple(manifest.task.image_shape) != shard_format.IMAGE_SHAPE:
        raise ShardError(
            f"{where}: image shape "
            f"{list(manifest.task.image_shape)}, expected {list(shard_format.IMAGE_SHAPE)}"
        )
    if manifest.task.num_classes < 2:
        raise ShardError(f"{where}: num_classes must be >= 2, got {manifest.task.num_classes}")


def _square_image_side(record_bytes: int) -> int | None:
    """The side of the square float32 image a record of this size would hold, if any."""
    pixels, rest = divmod(record_bytes - 4, 4)
    side = math.isqrt(max(pixels, 0))
    return side if rest == 0 and side > 0 and side * side == pixels else None


def _size_problem(size: int, expected: int) -> str:
    record = shard_format.RECORD_BYTES
    wanted = expected * record
    per_example = size // expected if expected and size % expected == 0 else 0
    side = _square_image_side(per_example) if per_example not in (0, record) else None
    if side is not None:
        # The manifest's count fits a different record length exactly: most
        # likely images of another size, not a damaged file.
        return (
            f"{expected} examples of {per_example} bytes, i.e. {side}x{side} pixels; a shard "
            f"record is {record} bytes ({shard_format.IMAGE_SHAPE[0]}x"
            f"{shard_format.IMAGE_SHAPE[1]} float32 pixels + int32 label): wrong image shape"
        )
    if size < wanted:
        return (
            f"{size} bytes, the manifest says {expected} examples ({wanted} bytes); "
            "the file is truncated"
        )
    return (
        f"{size} bytes, the manifest says {expected} examples ({wanted} bytes); "
        "the file is stale or not from this shard's build"
    )


def _check_client_file(
    shard_dir: Path,
    manifest: shard_format.Manifest,
    client: shard_format.ClientEntry,
    split: str,
    deep: bool,
) -> None:
    path = shard_dir / shard_format.client_path(split, client.id)
    expected = client.examples(split)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ShardError(f"{path}: missing (listed in the manifest)") from None
    except OSError as e:
        raise ShardError(f"{path}: cannot read ({e.strerror})") from None
    if size != expected * shard_format.RECORD_BYTES:
        raise ShardError(f"{path}: {_size_problem(size, expected)}")
    if not deep:
        # Readable, at least: a file the worker cannot open passed the quick
        # check and failed inside a round, where the run blamed the worker.
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise ShardError(f"{path}: cannot read ({e.strerror})") from None
        return
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ShardError(f"{path}: cannot read ({e.strerror})") from None
    if shard_format.sha256_bytes(data) != client.sha256(split):
        raise ShardError(f"{path}: checksum does not match the manifest; the file is corrupt")
    pixels, labels = shard_format.decode_records(data, str(path))
    if (
        not np.all(np.isfinite(pixels))
        or pixels.min(initial=0.0) < 0
        or pixels.max(initial=0.0) > 1
    ):
        raise ShardError(f"{path}: pixel values outside [0, 1]")
    if labels.size and (labels.min() < 0 or labels.max() >= manifest.task.num_classes):
        bad = int(labels[(labels < 0) | (labels >= manifest.task.num_classes)][0])
        raise ShardError(
            f"{path}: label {bad} out of range for {manifest.task.num_classes} classes"
        )


def _read(path: Path, size: int | None = None) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read() if size is None else f.read(size)
    except FileNotFoundError:
        raise ShardError(f"{path}: missing (listed in the manifest)") from None
    except OSError as e:
        raise ShardError(f"{path}: cannot read ({e.strerror})") from None


def _check_tensor_file(
    shard_dir: Path,
    manifest: shard_format.Manifest,
    client: shard_format.ClientEntry,
    split: str,
    deep: bool,
) -> None:
    """A stacked-tensors file: quick, its header (count, section table against
    the file's size); deep, every section decoded under the spec, the
    checksum and the label range."""
    path = shard_dir / shard_format.client_path(split, client.id, manifest.data)
    spec = manifest.data.spec
    expected = client.examples(split)
    data = _read(path, None if deep else tensor_records.header_bytes(spec))
    try:
        if deep:
            n, columns = tensor_records.decode(data, spec)
        else:
            size = path.stat().st_size
            n = tensor_records.check_header(data, spec, size)
    except tensor_records.FormatError as e:
        raise ShardError(f"{path}: {e}") from None
    if n != expected:
        raise ShardError(
            f"{path}: {n} examples, the manifest says {expected}; the file is stale or not "
            "from this shard's build"
        )
    if not deep:
        return
    if shard_format.sha256_bytes(data) != client.sha256(split):
        raise ShardError(f"{path}: checksum does not match the manifest; the file is corrupt")
    label_key, classes = manifest.data.label_key, manifest.task.num_classes
    if label_key is None or not classes:
        return
    index = [p for p, _ in element_spec.flatten(spec)].index(label_key)
    labels = np.asarray(columns[index])
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        bad = int(labels[(labels < 0) | (labels >= classes)][0])
        raise ShardError(f"{path}: label {bad} out of range for {classes} classes")
