"""Checks a shard before a worker serves it.

A bad shard must stop the worker at start with one line naming the file and
the problem, not fail a training round later on some other machine.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from shared import shard_format
from shared.shard_format import ShardError


def check_shard(shard_dir: Path, deep: bool = True) -> shard_format.Manifest:
    """Returns the shard's manifest; raises `ShardError` on the first problem.

    `deep` also reads every example: checksum, pixel range and label range.
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
    if tuple(manifest.task.image_shape) != shard_format.IMAGE_SHAPE:
        raise ShardError(
            f"{shard_dir / shard_format.MANIFEST_NAME}: image shape "
            f"{list(manifest.task.image_shape)}, expected {list(shard_format.IMAGE_SHAPE)}"
        )
    if manifest.task.num_classes < 2:
        raise ShardError(
            f"{shard_dir / shard_format.MANIFEST_NAME}: num_classes must be >= 2, "
            f"got {manifest.task.num_classes}"
        )
    for client in manifest.clients:
        if client.train_examples <= 0:
            raise ShardError(
                f"{shard_dir / shard_format.client_path('train', client.id)}: "
                f"client {client.id!r} has no training examples"
            )
        for split in shard_format.SPLITS:
            _check_client_file(shard_dir, manifest, client, split, deep)
    return manifest


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
