"""Writing a partitioned federated source as worker shard directories."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from deploy.sources import FederatedSource
from shared import preprocessing, shard_format

SHARD_PREFIX = "shard-"


def shard_dir(root: Path, index: int) -> Path:
    return root / f"{SHARD_PREFIX}{index:03d}"


def _build_id(source: FederatedSource, partition: dict, entries: list) -> str:
    digest = hashlib.sha256()
    digest.update(
        json.dumps([source.dataset, source.num_classes, partition], sort_keys=True).encode()
    )
    for entry in sorted(entries, key=lambda e: e.id):
        digest.update(f"{entry.id}:{entry.train_sha256}:{entry.test_sha256}".encode())
    return digest.hexdigest()[:16]


def write_shards(
    source: FederatedSource,
    assignment: Sequence[Sequence[int]],
    out_dir: Path,
    partition: dict,
    progress: Callable[[int], None] | None = None,
) -> list[shard_format.Manifest]:
    """Writes one shard directory per entry of `assignment` under `out_dir`.

    Shards are written under a temporary name and moved into place at the end,
    so an interrupted run never leaves a shard that looks complete.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / ".staging"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    per_shard: list[list[shard_format.ClientEntry]] = []
    for clients in assignment:
        entries = []
        index = len(per_shard)
        for i in clients:
            client = source.clients[i]
            target = staging / f"{index}"
            entries.append(
                shard_format.ClientEntry(
                    id=client.id,
                    train_examples=client.num_train,
                    test_examples=client.num_test,
                    train_sha256=shard_format.write_client(
                        target, client.id, "train", client.train_pixels, client.train_labels
                    ),
                    test_sha256=shard_format.write_client(
                        target, client.id, "test", client.test_pixels, client.test_labels
                    ),
                )
            )
            if progress is not None:
                progress(1)
        per_shard.append(entries)
    build_id = _build_id(source, partition, [e for es in per_shard for e in es])
    manifests = []
    for index, entries in enumerate(per_shard):
        manifest = shard_format.Manifest(
            task=source.task(),
            build_id=build_id,
            shard_index=index,
            num_shards=len(per_shard),
            partition=partition,
            clients=tuple(entries),
        )
        shard_format.write_manifest(staging / f"{index}", manifest)
        manifests.append(manifest)
    for index in range(len(per_shard)):
        final = shard_dir(out_dir, index)
        if final.exists():
            shutil.rmtree(final)
        (staging / f"{index}").rename(final)
    for stale in sorted(out_dir.glob(f"{SHARD_PREFIX}*")):
        if int(stale.name[len(SHARD_PREFIX) :]) >= len(per_shard):
            shutil.rmtree(stale)
    shutil.rmtree(staging)
    return manifests


def existing_shards(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.glob(f"{SHARD_PREFIX}*") if p.is_dir())


def merged_view(shard_dirs: Sequence[Path]) -> Path:
    """A new directory in which one executor sees every shard's client files.

    It is laid out like a worker's working directory (`shard/<split>/<id>.bin`),
    so a single-process TFF run over it reads exactly the files the workers
    read: the baseline that tests and the benchmark compare against.
    """
    root = Path(tempfile.mkdtemp(prefix="fedcompose-merged-"))
    for split in shard_format.SPLITS:
        (root / preprocessing.SHARD_LINK / split).mkdir(parents=True)
    for shard in shard_dirs:
        shard = shard.resolve()
        for client in shard_format.read_manifest(shard).clients:
            for split in shard_format.SPLITS:
                rel = shard_format.client_path(split, client.id)
                (root / preprocessing.SHARD_LINK / rel).symlink_to(shard / rel)
    return root
