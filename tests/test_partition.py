"""Partitioning: whole writers to balanced shards, and IID / Dirichlet re-splits."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter

import numpy as np
import pytest

from deploy.data import build, default_data, partition
from deploy.data.sources import ClientData, FederatedSource, PooledClient
from shared import shard_format
from shared.config import DataConfig
from shared.errors import UsageError
from tests.test_emnist_source import (
    example_hashes,
    fake_emnist,  # noqa: F401 - a fixture
    random_examples,
    read_shards,
    shard_example_counts,
)

SIZES_WITH_TIES = (4, 6, 6, 6, 10, 10, 16, 25, 40)


def random_source(num_writers: int = 40, num_classes: int = 10, seed: int = 0) -> FederatedSource:
    rng = np.random.default_rng(seed)
    clients = []
    for w in range(num_writers):
        train = random_examples(rng, int(rng.choice(SIZES_WITH_TIES)), num_classes)
        test = random_examples(rng, int(rng.integers(0, 6)), num_classes)
        clients.append(
            ClientData(
                id=f"w{w:03d}",
                train_pixels=train[0],
                train_labels=train[1].astype(np.int32),
                test_pixels=test[0],
                test_labels=test[1].astype(np.int32),
            )
        )
    return FederatedSource(dataset="random", num_classes=num_classes, clients=clients)


def split_hashes(source: FederatedSource) -> dict[str, Counter]:
    return {
        "train": Counter(h for c in source for h in example_hashes(c.train_pixels, c.train_labels)),
        "test": Counter(h for c in source for h in example_hashes(c.test_pixels, c.test_labels)),
    }


def client_rows(source: FederatedSource) -> list[tuple[str, list[int], list[int]]]:
    """Each client's selection of the pools: equal iff two re-splits are equal."""
    return [
        (c.id, np.asarray(c.train_rows).tolist(), np.asarray(c.test_rows).tolist()) for c in source
    ]


def shard_totals(source: FederatedSource, assignment: list[list[int]]) -> list[int]:
    sizes = [c.num_train + c.num_test for c in source.clients]
    return [sum(sizes[i] for i in shard) for shard in assignment]


def mean_label_skew(source: FederatedSource) -> float:
    """Mean total-variation distance of the clients' label mixes from the overall mix."""
    overall = np.bincount(source.pooled("train").labels, minlength=source.num_classes)
    overall = overall / overall.sum()
    distances = []
    for client in source:
        counts = np.bincount(client.train_labels, minlength=source.num_classes)
        distances.append(0.5 * np.abs(counts / counts.sum() - overall).sum())
    return float(np.mean(distances))


# --- whole writers to shards -----------------------------------------------------------


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7])
def test_assignment_is_whole_writers_balanced_within_one_writer(num_shards):
    source = random_source()
    assignment = partition.balanced_writer_assignment(source, num_shards, seed=0)

    assert sorted(i for shard in assignment for i in shard) == list(range(len(source.clients)))
    assert all(assignment), "every shard needs a writer"
    totals = shard_totals(source, assignment)
    largest = max(c.num_train + c.num_test for c in source.clients)
    assert max(totals) - min(totals) <= largest


def test_assignment_is_deterministic_and_the_seed_only_breaks_ties():
    source = random_source()
    first = partition.balanced_writer_assignment(source, 3, seed=0)
    assert partition.balanced_writer_assignment(source, 3, seed=0) == first
    others = [partition.balanced_writer_assignment(source, 3, seed=s) for s in range(1, 6)]
    assert any(other != first for other in others), "equal-sized writers give seeds a choice"
    best = max(shard_totals(source, first)) - min(shard_totals(source, first))
    for other in others:
        totals = shard_totals(source, other)
        assert max(totals) - min(totals) <= max(best, SIZES_WITH_TIES[-1])


def test_more_shards_than_writers_is_refused():
    with pytest.raises(UsageError, match="--workers 5 is more than the 4 writers"):
        partition.balanced_writer_assignment(random_source(num_writers=4), 5)


# --- re-splits -------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_resplit_deals_every_example_exactly_once_keeping_writer_sizes(scheme):
    source = random_source()
    resplit = partition.repartition(source, scheme, alpha=0.3, seed=1)

    assert split_hashes(resplit) == split_hashes(source)
    assert len(resplit.clients) == len(source.clients)
    # Synthetic client j is as large as writer j; only which examples it holds changes.
    assert [(c.num_train, c.num_test) for c in resplit] == [
        (c.num_train, c.num_test) for c in source
    ]
    ids = [c.id for c in resplit]
    assert len(set(ids)) == len(ids)
    shard_format.check_client_ids(ids)
    assert all(isinstance(c, PooledClient) for c in resplit)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_resplit_is_deterministic_per_seed(scheme):
    source = random_source()
    first = client_rows(partition.repartition(source, scheme, alpha=0.5, seed=3))
    assert client_rows(partition.repartition(source, scheme, alpha=0.5, seed=3)) == first
    assert client_rows(partition.repartition(source, scheme, alpha=0.5, seed=4)) != first


def test_small_alpha_skews_labels_more_than_iid():
    source = random_source(num_writers=60)
    iid = mean_label_skew(partition.iid_resplit(source, seed=0))
    skewed = mean_label_skew(partition.dirichlet_resplit(source, alpha=0.05, seed=0))
    mild = mean_label_skew(partition.dirichlet_resplit(source, alpha=100.0, seed=0))
    assert skewed > iid + 0.25, (skewed, iid)
    assert mild < skewed


def test_tiny_alpha_ends_quickly_and_deals_each_client_nearly_one_class():
    """numpy's Dirichlet sampler never returned for alpha 1e-12 (a hung
    `fedcompose data --partition dirichlet --alpha 1e-12`)."""
    source = random_source(num_writers=60)
    for alpha in (1e-12, 1e-300, 5e-324):
        started = time.monotonic()
        resplit = partition.dirichlet_resplit(source, alpha=alpha, seed=0)
        assert time.monotonic() - started < 10, alpha
        assert split_hashes(resplit) == split_hashes(source)
    assert mean_label_skew(resplit) > mean_label_skew(
        partition.dirichlet_resplit(source, alpha=0.05, seed=0)
    )
    # Above the threshold, numpy's draw as before: shards built earlier rebuild the same.
    rng = np.random.default_rng(1)
    prior = np.bincount(np.arange(10) % 7, minlength=10) / 10
    present = prior > 0
    assert np.array_equal(
        partition._dirichlet(rng, 0.3, present.sum(), prior[present], 5),
        np.random.default_rng(1).dirichlet(0.3 * present.sum() * prior[present], size=5),
    )


def test_dirichlet_needs_a_positive_alpha():
    for alpha in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            partition.dirichlet_resplit(random_source(), alpha)


def test_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match="unknown partition"):
        partition.repartition(random_source(), "by-zodiac-sign")


def test_default_source_resplits_too():
    source = default_data.load(num_writers=20)
    resplit = partition.iid_resplit(source, seed=0)
    assert split_hashes(resplit) == split_hashes(source)


def test_resplit_of_emnist_selects_rows_of_the_same_arrays(fake_emnist):  # noqa: F811
    from deploy.data import emnist

    source = emnist.load(fake_emnist.path)
    train_pool = source.pooled("train")
    resplit = partition.dirichlet_resplit(source, alpha=0.5, seed=0)
    assert all(c.train_pool is train_pool for c in resplit), "a re-split must not copy the data"


# --- through build_shards, the path `fedcompose run` and `fedcompose data` take ---------


@pytest.mark.parametrize("scheme", ["natural", "iid", "dirichlet"])
def test_emnist_shards_hold_every_example_once_in_whole_clients(fake_emnist, tmp_path, scheme):  # noqa: F811
    spec = DataConfig(
        source="emnist", emnist_path=str(fake_emnist.path), partition=scheme, alpha=0.2, data_seed=5
    )
    shard_dirs = build.build_shards(spec, tmp_path / "shards", 3)

    assert shard_example_counts(shard_dirs) == fake_emnist.example_counts()
    manifests = [shard_format.read_manifest(d) for d in shard_dirs]
    totals = [m.train_examples + m.test_examples for m in manifests]
    clients = [c for m in manifests for c in m.clients]
    assert max(totals) - min(totals) <= max(c.train_examples + c.test_examples for c in clients)
    read_back = read_shards(shard_dirs)
    assert sorted(read_back["train"]) == sorted(c.id for c in clients)  # whole clients, once
    info = manifests[0].partition
    assert (info["scheme"], info["seed"]) == (scheme, 5)
    assert info["alpha"] == (0.2 if scheme == "dirichlet" else None)
    assert info["writers_left_out"] == 1
    assert len({m.build_id for m in manifests}) == 1


def test_same_spec_gives_identical_shards(fake_emnist, tmp_path):  # noqa: F811
    spec = DataConfig(source="emnist", emnist_path=str(fake_emnist.path), partition="iid")
    first = build.build_shards(spec, tmp_path / "a", 2)
    second = build.build_shards(spec, tmp_path / "b", 2)
    assert [shard_format.read_manifest(d).build_id for d in first] == [
        shard_format.read_manifest(d).build_id for d in second
    ]
    other_seed = dataclasses.replace(spec, data_seed=1)
    third = build.build_shards(other_seed, tmp_path / "c", 2)
    assert (
        shard_format.read_manifest(third[0]).build_id
        != shard_format.read_manifest(first[0]).build_id
    )
