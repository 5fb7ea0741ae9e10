"""The on-disk format of a worker shard, readable without TensorFlow.

A shard is a directory::

    manifest.json            what the shard holds (see `Manifest`)
    train/<client_id>.bin    one file per client and split: fixed-length
    test/<client_id>.bin     records of 784 float32 pixels + one int32 label

Pixels are stored as TFF's federated EMNIST stores them (28x28, float32 in
[0, 1], 1.0 is background); labels are class indices. Both the real EMNIST and
the offline default go through this one format, so the worker-side TensorFlow
reader and the numpy validator below stay in step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from shared import files
from shared.errors import DataError

FORMAT_NAME = "fedcompose-shard"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CLIENT_SUFFIX = ".bin"
SPLITS = ("train", "test")
IMAGE_SHAPE = (28, 28)
PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
PIXEL_BYTES = PIXELS * 4
RECORD_BYTES = PIXEL_BYTES + 4
RECORD_DTYPE = np.dtype([("pixels", "<f4", (PIXELS,)), ("label", "<i4")])
CLIENT_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

assert RECORD_DTYPE.itemsize == RECORD_BYTES


class ShardError(DataError):
    """A shard or manifest is missing, malformed or inconsistent."""


@dataclasses.dataclass(frozen=True)
class Task:
    """What a model trained on this data must fit; equal on every worker."""

    dataset: str
    num_classes: int
    image_shape: tuple[int, int] = IMAGE_SHAPE

    def describe(self) -> str:
        return f"{self.dataset} ({self.num_classes} classes)"


@dataclasses.dataclass(frozen=True, slots=True)
class ClientEntry:
    """One client of a shard. Slotted: a coordinator holds one per hosted
    client (100,000 of them cost 65 MB as plain dataclasses with checksums)."""

    id: str
    train_examples: int
    test_examples: int
    train_sha256: str
    test_sha256: str

    def examples(self, split: str) -> int:
        return self.train_examples if split == "train" else self.test_examples

    def sha256(self, split: str) -> str:
        return self.train_sha256 if split == "train" else self.test_sha256


@dataclasses.dataclass(frozen=True)
class Manifest:
    task: Task
    build_id: str
    shard_index: int
    num_shards: int
    partition: dict
    clients: tuple[ClientEntry, ...]
    format_version: int = FORMAT_VERSION

    @property
    def train_examples(self) -> int:
        return sum(c.train_examples for c in self.clients)

    @property
    def test_examples(self) -> int:
        return sum(c.test_examples for c in self.clients)

    def to_json(self) -> str:
        body = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "task": dataclasses.asdict(self.task),
            "build_id": self.build_id,
            "shard_index": self.shard_index,
            "num_shards": self.num_shards,
            "partition": self.partition,
            "totals": {
                "clients": len(self.clients),
                "train_examples": self.train_examples,
                "test_examples": self.test_examples,
            },
            "clients": [dataclasses.asdict(c) for c in self.clients],
        }
        return json.dumps(body, indent=1, sort_keys=False)

    @classmethod
    def from_json(
        cls, text: str | bytes, origin: str = MANIFEST_NAME, checksums: bool = True
    ) -> Manifest:
        """The manifest in `text`. `checksums=False` leaves the per-file SHA-256
        out (empty): the coordinator never reads client files, only ids and counts."""
        try:
            body = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise ShardError(f"{origin}: not valid JSON ({e})") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT_NAME:
            raise ShardError(f"{origin}: not a {FORMAT_NAME} manifest")
        version = body.get("format_version")
        if version != FORMAT_VERSION:
            raise ShardError(
                f"{origin}: format version {version!r}, this fedcompose reads version "
                f"{FORMAT_VERSION}; rebuild the shard with `fedcompose data`"
            )
        try:
            task = body["task"]
            clients = tuple(
                ClientEntry(
                    id=str(c["id"]),
                    train_examples=int(c["train_examples"]),
                    test_examples=int(c["test_examples"]),
                    train_sha256=str(c["train_sha256"]) if checksums else "",
                    test_sha256=str(c["test_sha256"]) if checksums else "",
                )
                for c in body["clients"]
            )
            return cls(
                task=Task(
                    dataset=str(task["dataset"]),
                    num_classes=int(task["num_classes"]),
                    image_shape=tuple(task["image_shape"]),
                ),
                build_id=str(body["build_id"]),
                shard_index=int(body["shard_index"]),
                num_shards=int(body["num_shards"]),
                partition=dict(body["partition"]),
                clients=clients,
                format_version=version,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ShardError(f"{origin}: missing or malformed field ({e!r})") from None


def client_path(split: str, client_id: str) -> str:
    """Path of a client's file relative to the shard directory."""
    return f"{split}/{client_id}{CLIENT_SUFFIX}"


def encode_records(pixels: np.ndarray, labels: np.ndarray) -> bytes:
    pixels = np.asarray(pixels, dtype=np.float32).reshape(len(labels), PIXELS)
    records = np.empty(len(labels), dtype=RECORD_DTYPE)
    records["pixels"] = pixels
    records["label"] = np.asarray(labels, dtype=np.int32)
    return records.tobytes()


def decode_records(data: bytes, origin: str) -> tuple[np.ndarray, np.ndarray]:
    if len(data) % RECORD_BYTES:
        raise ShardError(
            f"{origin}: {len(data)} bytes is not a whole number of {RECORD_BYTES}-byte "
            "records (truncated or not a shard file)"
        )
    records = np.frombuffer(data, dtype=RECORD_DTYPE)
    return records["pixels"].reshape(-1, *IMAGE_SHAPE), records["label"]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_client(
    shard_dir: Path, client_id: str, split: str, pixels: np.ndarray, labels: np.ndarray
) -> str:
    """Writes one client's split and returns its checksum."""
    data = encode_records(pixels, labels)
    path = shard_dir / client_path(split, client_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomic(path, data)
    return sha256_bytes(data)


def write_manifest(shard_dir: Path, manifest: Manifest) -> None:
    files.write_atomic(shard_dir / MANIFEST_NAME, manifest.to_json().encode())


def read_manifest(shard_dir: Path) -> Manifest:
    path = shard_dir / MANIFEST_NAME
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ShardError(
            f"{path}: no manifest; is {shard_dir} a shard made by `fedcompose data`?"
        ) from None
    except OSError as e:
        raise ShardError(f"{path}: cannot read ({e.strerror})") from None
    return Manifest.from_json(text, origin=str(path))


def check_client_ids(ids: Iterable[str]) -> None:
    for cid in ids:
        if not CLIENT_ID_PATTERN.match(cid):
            raise ShardError(
                f"client id {cid!r} is not usable as a file name "
                "(letters, digits, '_', '.', '-'; at most 128 characters)"
            )
