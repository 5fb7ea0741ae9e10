"""The contract of a worker's working directory and its start-up line.

TFF's executor service (`worker_binary`) resolves relative paths against its
working directory, and computations the coordinator sends read files by
relative path. So both sides agree on this layout::

    <working directory>/
        shard -> /path/to/the/shard      the shard, linked (see shard_format)
        worker.json                      who this worker is (`WorkerInfo`)

Computations read `shard/manifest.json`, `shard/<split>/<client><suffix>` and
`worker.json`. A launcher knows a worker serves when the worker's log shows
`READY_MARK`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from shared import files, shard_format

SHARD_LINK = "shard"
WORKER_INFO_NAME = "worker.json"
MANIFEST_PATH = f"{SHARD_LINK}/{shard_format.MANIFEST_NAME}"
"""The shard's manifest, relative to the working directory."""
READY_MARK = "ready: serving"
"""The worker logs a line holding this once its executor service answers."""


def split_dir(split: str) -> str:
    """The directory of a split's client files, relative to the working directory."""
    return f"{SHARD_LINK}/{split}"


def client_file(
    split: str, client_id: str, data: shard_format.DataFormat = shard_format.EMNIST_FORMAT
) -> str:
    """A client's file relative to the working directory."""
    return f"{SHARD_LINK}/{shard_format.client_path(split, client_id, data)}"


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """What a worker says about itself; the coordinator reads it remotely."""

    tff_version: str = "unknown"
    python: str = ""
    host: str = "?"
    pid: int = 0
    port: int = 0
    shard: str = ""
    started_at: float = 0.0
    tls: bool = False

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, data: str | bytes) -> WorkerInfo:
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return cls()
        if not isinstance(body, dict):
            return cls()
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in body.items() if k in known})


def lay_out(directory: Path, shard_dir: Path, info: WorkerInfo | None = None) -> None:
    """Makes `directory` a worker's working directory serving `shard_dir`."""
    (directory / SHARD_LINK).symlink_to(shard_dir.resolve(), target_is_directory=True)
    if info is not None:
        files.write_atomic(directory / WORKER_INFO_NAME, info.to_json())
