"""What a run was trained on (`trained_on.json`): the record and how two differ."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from shared import shard_format


def data_record(manifests: Sequence[shard_format.Manifest]) -> dict:
    """What the workers serve, as `trained_on.json` records it."""
    ids = sorted(c.id for m in manifests for c in m.clients)
    first = manifests[0]
    return {
        "dataset": first.task.dataset,
        "num_classes": first.task.num_classes,
        "build_id": first.build_id,
        "shards_built": first.num_shards,
        "clients": len(ids),
        "client_ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        "clients_per_shard": {
            str(m.shard_index): len(m.clients)
            for m in sorted(manifests, key=lambda m: m.shard_index)
        },
    }


RECORD_FIELDS: dict[str, type] = {
    "dataset": str,
    "num_classes": int,
    "build_id": str,
    "shards_built": int,
    "clients": int,
    "client_ids_sha256": str,
    "clients_per_shard": dict,
}
"""`data_record`'s fields and their types: a trained_on.json without them
(edited, or another program's) cannot say what a run was trained on."""


def describe_record(record: dict) -> str:
    shards = record.get("clients_per_shard", {})
    return (
        f"build {record.get('build_id')} of {record.get('dataset')} "
        f"({record.get('num_classes')} classes), {record.get('clients')} clients in "
        f"{len(shards)} shard(s) of {record.get('shards_built')}"
    )


def record_differences(before: dict, now: dict) -> list[str]:
    names = {
        "dataset": "dataset",
        "num_classes": "classes",
        "build_id": "build",
        "shards_built": "shards built",
        "clients": "clients",
        "clients_per_shard": "clients per shard",
    }
    found = [
        f"{label} {before.get(key)!r} -> {now.get(key)!r}"
        for key, label in names.items()
        if before.get(key) != now.get(key)
    ]
    if not found and before.get("client_ids_sha256") != now.get("client_ids_sha256"):
        found.append("other client ids")
    return found
