"""Writing a partitioned federated source as worker shard directories."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from shared import files, shard_format, worker_dir

SHARD_PREFIX = "shard-"
RECIPE_FILE = "data-spec.json"
"""What a set of shards was built from; equal recipes give equal shards."""


def shard_dir(root: Path, index: int) -> Path:
    return root / f"{SHARD_PREFIX}{index:03d}"


def _build_id(source: Any, partition: dict, entries: list, data: shard_format.DataFormat) -> str:
    digest = hashlib.sha256()
    described = [source.dataset, source.num_classes, partition]
    if data != shard_format.EMNIST_FORMAT:  # emnist-fixed builds keep their ids
        described.append(data.to_json())
    digest.update(json.dumps(described, sort_keys=True).encode())
    for entry in sorted(entries, key=lambda e: e.id):
        digest.update(f"{entry.id}:{entry.train_sha256}:{entry.test_sha256}".encode())
    return digest.hexdigest()[:16]


ClientWriter = Callable[[Path, Any], shard_format.ClientEntry]
"""Writes one client's train and test files under a shard directory."""


def write_emnist_client(target: Path, client: Any) -> shard_format.ClientEntry:
    return shard_format.ClientEntry(
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


def write_shards(
    source: Any,
    assignment: Sequence[Sequence[int]],
    out_dir: Path,
    partition: dict,
    progress: Callable[[int], None] | None = None,
    recipe: dict | None = None,
    data: shard_format.DataFormat = shard_format.EMNIST_FORMAT,
    write_client: ClientWriter = write_emnist_client,
) -> list[shard_format.Manifest]:
    """Writes one shard directory per entry of `assignment` under `out_dir`,
    and `recipe` (what they were built from) once all are in place.

    Shards are written under a temporary name and moved into place at the end,
    so an interrupted run never leaves a shard that looks complete, and the
    old recipe is removed first, so an interrupted rebuild never looks reusable.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RECIPE_FILE).unlink(missing_ok=True)
    staging = out_dir / ".staging"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        return _write_staged(
            source, assignment, out_dir, staging, partition, progress, recipe, data, write_client
        )
    except BaseException:
        # A full disk or an interrupt: give the space back now, not at the next build.
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_staged(
    source: Any,
    assignment: Sequence[Sequence[int]],
    out_dir: Path,
    staging: Path,
    partition: dict,
    progress: Callable[[int], None] | None,
    recipe: dict | None,
    data: shard_format.DataFormat,
    write_client: ClientWriter,
) -> list[shard_format.Manifest]:
    per_shard: list[list[shard_format.ClientEntry]] = []
    for clients in assignment:
        entries = []
        index = len(per_shard)
        for i in clients:
            entries.append(write_client(staging / f"{index}", source.clients[i]))
            if progress is not None:
                progress(1)
        per_shard.append(entries)
    build_id = _build_id(source, partition, [e for es in per_shard for e in es], data)
    manifests = []
    for index, entries in enumerate(per_shard):
        manifest = shard_format.Manifest(
            task=source.task(),
            build_id=build_id,
            shard_index=index,
            num_shards=len(per_shard),
            partition=partition,
            clients=tuple(entries),
            data=data,
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
    if recipe is not None:
        files.write_atomic(out_dir / RECIPE_FILE, json.dumps(recipe, indent=1))
    return manifests


def existing_shards(out_dir: Path) -> list[Path]:
    return sorted(p for p in out_dir.glob(f"{SHARD_PREFIX}*") if p.is_dir())


def reusable(out_dir: Path, recipe: dict) -> list[Path] | None:
    """The shards in `out_dir` if they were built, completely, from `recipe`."""
    found = existing_shards(out_dir)
    try:
        if json.loads((out_dir / RECIPE_FILE).read_text()) != recipe:
            return None
        if len(found) != recipe.get("num_shards"):
            return None
        for d in found:
            shard_format.read_manifest(d)
    except (OSError, ValueError, shard_format.ShardError):
        return None
    return found


def merged_view(shard_dirs: Sequence[Path]) -> Path:
    """A new directory in which one executor sees every shard's client files.

    It is laid out like a worker's working directory (`shard/<split>/<id>.bin`),
    so a single-process TFF run over it reads exactly the files the workers
    read: the baseline that tests and the benchmark compare against.
    """
    root = Path(tempfile.mkdtemp(prefix="fedcompose-merged-"))
    for split in shard_format.SPLITS:
        (root / worker_dir.split_dir(split)).mkdir(parents=True)
    for shard in shard_dirs:
        shard = shard.resolve()
        manifest = shard_format.read_manifest(shard)
        for client in manifest.clients:
            for split in shard_format.SPLITS:
                target = shard / shard_format.client_path(split, client.id, manifest.data)
                link = root / worker_dir.client_file(split, client.id, manifest.data)
                link.symlink_to(target)
    return root
