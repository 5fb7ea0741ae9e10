"""From a data specification to worker shards on disk.

`fedcompose run` and `fedcompose data` both come through `build_shards`, so
the offline default and the real EMNIST take one code path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from deploy import default_data, partition, shards
from deploy.sources import FederatedSource, Progress, no_progress
from shared import shard_format

log = logging.getLogger("fedcompose.data")

SOURCES = ("default", "emnist")
PARTITIONS = ("natural", "iid", "dirichlet")
SPEC_FILE = "data-spec.json"


@dataclasses.dataclass(frozen=True)
class DataSpec:
    source: str = "default"
    emnist_path: str = ""
    """emnist_all.sqlite, or a directory that holds (or will cache) it."""
    only_digits: bool = True
    partition: str = "natural"
    alpha: float = 0.5
    seed: int = 0
    writers: int = 60
    """Synthetic writers of the default source."""


def load_source(spec: DataSpec, progress: Progress = no_progress) -> FederatedSource:
    """The spec's data with its natural writers; raises `DataSourceError` if unreadable."""
    if spec.source == "default":
        return default_data.load(num_writers=spec.writers, alpha=0.5, seed=spec.seed)
    if spec.source == "emnist":
        from deploy import emnist

        return emnist.load(spec.emnist_path, only_digits=spec.only_digits, progress=progress)
    raise ValueError(f"unknown data source {spec.source!r}; choose one of {', '.join(SOURCES)}")


def partition_info(spec: DataSpec, num_shards: int, source: FederatedSource) -> dict:
    """What the manifests record about how the shards were made."""
    return {
        "scheme": spec.partition,
        "alpha": spec.alpha if spec.partition == "dirichlet" else None,
        "seed": spec.seed,
        "num_shards": num_shards,
        "source": spec.source,
        "source_description": source.description,
        "clients": len(source.clients),
        "writers_left_out": source.writers_left_out,
        "examples_left_out": source.examples_left_out,
    }


def build_shards(
    spec: DataSpec,
    out_dir: Path,
    num_shards: int,
    reuse: bool = True,
    progress: Progress = no_progress,
) -> list[Path]:
    """Writes `num_shards` shards under `out_dir` (or reuses identical ones).

    Raises `DataSourceError` if the data cannot be read and `ValueError` for a
    spec the data cannot meet (say more shards than writers).
    """
    recorded = out_dir / SPEC_FILE
    wanted = {"spec": dataclasses.asdict(spec), "num_shards": num_shards}
    existing = shards.existing_shards(out_dir)
    if reuse and recorded.exists() and len(existing) == num_shards:
        try:
            if json.loads(recorded.read_text()) == wanted:
                for d in existing:
                    shard_format.read_manifest(d)
                log.info("reusing %d shards in %s", num_shards, out_dir)
                return existing
        except (ValueError, shard_format.ShardError):
            pass
    source = load_source(spec, progress)
    source = partition.repartition(source, spec.partition, spec.alpha, spec.seed)
    assignment = partition.balanced_writer_assignment(source, num_shards, spec.seed)
    # Forget the old spec first: an interrupted rebuild must never look reusable.
    recorded.unlink(missing_ok=True)
    with progress("writing shards", len(source.clients), "clients") as advance:
        shards.write_shards(
            source, assignment, out_dir, partition_info(spec, num_shards, source), advance
        )
    recorded.write_text(json.dumps(wanted, indent=1))
    return shards.existing_shards(out_dir)
