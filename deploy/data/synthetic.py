"""Synthetic writers for the benchmark, written as real worker shards.

Federated EMNIST has about 3,400 writers; the offline sklearn digits have
1,797 images. A benchmark at EMNIST's scale therefore derives writers from the
digit pool: each writer draws its examples (with replacement) from the pool,
with its own label mix and a little pixel noise, all from a seed, so that
every run and every worker count sees exactly the same clients. The writers
go through `deploy.shards.write_shards`, so workers serve them exactly like
real data.

Built shards are cached under the data directory, keyed by everything that
determines their content, and reused by later runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from deploy.data import default_data, shards
from deploy.data.sources import ClientData, FederatedSource
from shared import shard_format

DATASET_NAME = "bench-synthetic-digits"


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    writers: int = 3400
    mean_train_examples: int = 24
    """Writers hold between half and 1.5 times this many training examples."""
    test_examples: int = 4
    label_alpha: float = 0.5
    """Dirichlet concentration of each writer's label mix (lower: more skew)."""
    pixel_noise: float = 0.03
    seed: int = 0

    def key(self) -> str:
        return (
            f"w{self.writers}-n{self.mean_train_examples}-t{self.test_examples}"
            f"-a{self.label_alpha:g}-z{self.pixel_noise:g}-s{self.seed}"
        )


def _writer(
    w: int, spec: SyntheticSpec, pixels: np.ndarray, by_label: list[np.ndarray]
) -> ClientData:
    # One generator per writer: a writer's data does not depend on how many
    # writers there are or in which order they are made.
    rng = np.random.default_rng([spec.seed, w])
    low = max(1, spec.mean_train_examples // 2)
    high = max(low, spec.mean_train_examples + spec.mean_train_examples // 2)
    num_train = int(rng.integers(low, high + 1))
    mix = rng.dirichlet(np.full(len(by_label), spec.label_alpha))
    labels = rng.choice(len(by_label), size=num_train + spec.test_examples, p=mix)
    rows = np.array([rng.choice(by_label[k]) for k in labels], dtype=np.int64)
    images = pixels[rows] + rng.normal(0.0, spec.pixel_noise, pixels[rows].shape).astype(np.float32)
    images = np.clip(images, 0.0, 1.0, out=images)
    labels = labels.astype(np.int32)
    return ClientData(
        id=f"synth_{w:05d}",
        train_pixels=images[:num_train],
        train_labels=labels[:num_train],
        test_pixels=images[num_train:],
        test_labels=labels[num_train:],
    )


def synthetic_source(spec: SyntheticSpec) -> FederatedSource:
    pixels, labels = default_data.digits_as_emnist()
    by_label = [np.flatnonzero(labels == k) for k in range(default_data.NUM_CLASSES)]
    clients = [_writer(w, spec, pixels, by_label) for w in range(spec.writers)]
    return FederatedSource(
        dataset=DATASET_NAME,
        num_classes=default_data.NUM_CLASSES,
        clients=clients,
        description=f"{spec.writers} synthetic writers drawn from the sklearn digits",
    )


def round_robin(num_clients: int, num_shards: int) -> list[list[int]]:
    """Client indices per shard: client i (in id order) to shard i mod W."""
    return [list(range(s, num_clients, num_shards)) for s in range(num_shards)]


def build_shard_sets(
    spec: SyntheticSpec,
    data_dir: Path,
    worker_counts: Sequence[int],
    progress: Callable[[int], None] | None = None,
) -> dict[int, list[Path]]:
    """Shards of the same writers for each worker count, built or reused."""
    result: dict[int, list[Path]] = {}
    source: FederatedSource | None = None
    for count in sorted(set(worker_counts)):
        out_dir = data_dir / spec.key() / f"workers-{count}"
        wanted = _recipe(spec, count)
        found = shards.reusable(out_dir, wanted)
        if found is None:
            if source is None:
                source = synthetic_source(spec)
            partition = {"scheme": "round-robin", "seed": spec.seed, "num_shards": count}
            shards.write_shards(
                source,
                round_robin(len(source.clients), count),
                out_dir,
                partition,
                progress,
                recipe=wanted,
            )
            found = shards.existing_shards(out_dir)
        result[count] = found
    return result


def client_ids(spec: SyntheticSpec) -> list[str]:
    return sorted(f"synth_{w:05d}" for w in range(spec.writers))


def client_arrays(
    shard_dirs: Sequence[Path], ids: Sequence[str]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Each of `ids`' training examples (pixels, labels), in the given order."""
    where: dict[str, Path] = {}
    for d in shard_dirs:
        for c in shard_format.read_manifest(d).clients:
            where[c.id] = d
    for cid in ids:
        path = where[cid] / shard_format.client_path("train", cid)
        yield shard_format.decode_records(path.read_bytes(), str(path))


def read_clients(shard_dirs: Sequence[Path], ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The training examples of `ids`, concatenated in the given order."""
    pixels, labels = zip(*client_arrays(shard_dirs, ids), strict=True)
    return np.concatenate(pixels), np.concatenate(labels)


def _recipe(spec: SyntheticSpec, num_shards: int) -> dict:
    return {"spec": dataclasses.asdict(spec), "num_shards": num_shards}


def is_built(spec: SyntheticSpec, data_dir: Path, num_shards: int) -> bool:
    out_dir = data_dir / spec.key() / f"workers-{num_shards}"
    return shards.reusable(out_dir, _recipe(spec, num_shards)) is not None
