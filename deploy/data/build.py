"""From the data settings to worker shards on disk.

`fedcompose run` and `fedcompose data` both come through `build_shards`, so
the offline default and the real EMNIST take one code path.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from deploy.data import default_data, partition, shards
from deploy.data.sources import FederatedSource, Progress, no_progress
from shared.config import DataConfig

log = logging.getLogger("fedcompose.data")


def content_settings(data: DataConfig) -> dict:
    """The data settings that decide what the shards hold (not where they go)."""
    return {
        f.name: getattr(data, f.name)
        for f in dataclasses.fields(DataConfig)
        if f.metadata.get("fixed_on_resume")
    }


def load_source(data: DataConfig, progress: Progress = no_progress) -> FederatedSource:
    """The data with its natural writers; raises `DataSourceError` if unreadable."""
    if data.source == "emnist":
        from deploy.data import emnist

        return emnist.load(data.emnist_path, only_digits=data.only_digits, progress=progress)
    return default_data.load(num_writers=data.writers, alpha=0.5, seed=data.data_seed)


def partition_info(data: DataConfig, num_shards: int, source: FederatedSource) -> dict:
    """What the manifests record about how the shards were made."""
    return {
        "scheme": data.partition,
        "alpha": data.alpha if data.partition == "dirichlet" else None,
        "seed": data.data_seed,
        "num_shards": num_shards,
        "source": data.source,
        "source_description": source.description,
        "clients": len(source.clients),
        "writers_left_out": source.writers_left_out,
        "examples_left_out": source.examples_left_out,
    }


def build_shards(
    data: DataConfig,
    out_dir: Path,
    num_shards: int,
    reuse: bool = True,
    progress: Progress = no_progress,
) -> list[Path]:
    """Writes `num_shards` shards under `out_dir` (or reuses identical ones).

    Raises `DataSourceError` if the data cannot be read and `UsageError` for
    settings the data cannot meet (say more shards than writers).
    """
    wanted = {"spec": content_settings(data), "num_shards": num_shards}
    if reuse:
        found = shards.reusable(out_dir, wanted)
        if found is not None:
            log.info("reusing %d shards in %s", num_shards, out_dir)
            return found
    source = load_source(data, progress)
    source = partition.repartition(source, data.partition, data.alpha, data.data_seed)
    assignment = partition.balanced_writer_assignment(source, num_shards, data.data_seed)
    with progress("writing shards", len(source.clients), "clients") as advance:
        shards.write_shards(
            source,
            assignment,
            out_dir,
            partition_info(data, num_shards, source),
            advance,
            recipe=wanted,
        )
    return shards.existing_shards(out_dir)
