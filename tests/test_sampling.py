"""Client sampling is a pure, seeded function: uniform without replacement,
grouped by the worker hosting each client, the same in every run."""

from __future__ import annotations

import collections

import pytest

from coordinator.federation import Federation, sample_clients, shuffle_seed

IDS = [f"c{i:03d}" for i in range(60)]


def test_sampling_is_without_replacement_and_deterministic():
    first = sample_clients(IDS, round_num=3, clients_per_round=10, seed=7)
    assert len(first) == len(set(first)) == 10
    assert first == sample_clients(IDS, 3, 10, 7)
    assert first != sample_clients(IDS, 4, 10, 7)
    assert first != sample_clients(IDS, 3, 10, 8)
    assert sample_clients(IDS, 1, 60, 0) == IDS


def test_every_client_is_sampled_about_equally_often():
    counts = collections.Counter(c for r in range(1, 601) for c in sample_clients(IDS, r, 10, 0))
    assert set(counts) == set(IDS)
    # 600 rounds x 10 of 60: 100 each on average; a uniform sampler stays well within 40%.
    assert min(counts.values()) > 60 and max(counts.values()) < 140


def test_rounds_are_grouped_by_hosting_worker():
    owner = {c: i % 3 for i, c in enumerate(IDS)}
    fed = Federation([], [], None, sorted(IDS), owner)  # type: ignore[arg-type]
    grouped = fed.sample(round_num=5, clients_per_round=12, seed=1)
    flat = sorted(c for ids in grouped.values() for c in ids)
    assert flat == sorted(sample_clients(IDS, 5, 12, 1))
    assert all(owner[c] == w for w, ids in grouped.items() for c in ids)


@pytest.mark.parametrize(("seed", "round_num"), [(0, 1), (3, 17)])
def test_shuffle_seeds_differ_per_round(seed, round_num):
    assert shuffle_seed(seed, round_num) != shuffle_seed(seed, round_num + 1)
