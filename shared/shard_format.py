"""The on-disk format of a worker shard, readable without TensorFlow.

A shard is a directory::

    manifest.json                what the shard holds (see `Manifest`)
    train/<client_id><suffix>    one file per client and split, in the
    test/<client_id><suffix>     shard's record encoding

Manifest format version 2 records the data's format (`DataFormat`, under
"data" in the JSON): the raw, unbatched per-example element spec
(`shared.element_spec`, JSON), the record encoding, and which field is the
label (if any). Two encodings:

- "emnist-fixed" (`.bin`): fixed-length records of 784 float32 pixels + one
  int32 label, as TFF's federated EMNIST stores them (28x28, float32 in
  [0, 1], 1.0 is background; labels are class indices). Its element spec is
  always TFF-EMNIST's (`element_spec.EMNIST_RAW`). The offline default and
  the real EMNIST use it: the fastest path for the built-in models.
- "stacked-tensors" (`.tensors`): any element spec, each leaf stacked over
  the client's examples (`shared.tensor_records`).

Version 1 manifests (no "data") are read as they are: emnist-fixed with
TFF-EMNIST's element spec and label "label". The worker-side TensorFlow
readers (`shared.preprocessing`, `shared.tensor_reader`) and the numpy
validator (`client_worker.shard_check`) go by this one description.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from shared import element_spec, files, tensor_records
from shared.errors import DataError

FORMAT_NAME = "fedcompose-shard"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
CLIENT_SUFFIX = ".bin"
EMNIST_FIXED = "emnist-fixed"
STACKED_TENSORS = tensor_records.ENCODING
SUFFIXES = {EMNIST_FIXED: CLIENT_SUFFIX, STACKED_TENSORS: tensor_records.SUFFIX}
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
class DataFormat:
    """How a shard's examples are structured and stored; equal on every worker."""

    encoding: str = EMNIST_FIXED
    spec: element_spec.ElementSpec = dataclasses.field(
        default_factory=lambda: element_spec.EMNIST_RAW
    )
    label_key: str | None = "label"
    """The label's path in the element spec (`element_spec.flatten`), or None."""

    @property
    def suffix(self) -> str:
        return SUFFIXES[self.encoding]

    def describe(self) -> str:
        return f"{element_spec.describe(self.spec)} ({self.encoding})"

    def to_json(self) -> dict:
        return {
            "encoding": self.encoding,
            "element_spec": element_spec.to_json(self.spec),
            "label_key": self.label_key,
        }

    @classmethod
    def from_json(cls, body: dict) -> DataFormat:
        encoding = str(body["encoding"])
        if encoding not in SUFFIXES:
            raise ValueError(
                f"record encoding {encoding!r}, this fedcompose reads {', '.join(SUFFIXES)}"
            )
        label = body.get("label_key")
        return cls(encoding, element_spec.from_json(body["element_spec"]), label and str(label))


EMNIST_FORMAT = DataFormat()
"""Version 1 shards, and every shard of the default data and EMNIST."""


@dataclasses.dataclass(frozen=True)
class Task:
    """What a model trained on this data must fit; equal on every worker."""

    dataset: str
    num_classes: int
    image_shape: tuple[int, ...] = IMAGE_SHAPE
    """The EMNIST image's shape; () for data of any other structure."""

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
    data: DataFormat = EMNIST_FORMAT

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
            "data": self.data.to_json(),
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
        if version not in READABLE_VERSIONS:
            raise ShardError(
                f"{origin}: format version {version!r}, this fedcompose reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}; rebuild the shard with "
                "`fedcompose data` (or upgrade fedcompose)"
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
                data=DataFormat.from_json(body["data"]) if version >= 2 else EMNIST_FORMAT,
            )
        except element_spec.SpecError as e:
            raise ShardError(f"{origin}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise ShardError(f"{origin}: missing or malformed field ({e!r})") from None


def client_path(split: str, client_id: str, data: DataFormat = EMNIST_FORMAT) -> str:
    """Path of a client's file relative to the shard directory."""
    return f"{split}/{client_id}{data.suffix}"


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


def write_tensors(
    shard_dir: Path,
    client_id: str,
    split: str,
    data: DataFormat,
    columns: Sequence[tensor_records.Column],
) -> tuple[str, int]:
    """Writes one client's split in the stacked-tensors encoding (columns in
    leaf order, see `shared.tensor_records`); returns its checksum and size."""
    encoded = tensor_records.encode(data.spec, columns)
    path = shard_dir / client_path(split, client_id, data)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomic(path, encoded)
    return sha256_bytes(encoded), tensor_records.num_examples(data.spec, columns)


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
