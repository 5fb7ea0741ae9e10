"""Client sampling is a pure, seeded function: uniform without replacement,
grouped by the worker hosting each client, the same in every run."""

from __future__ import annotations

import collections

import pytest

from coordinator.federation import (
    Federation,
    sample_clients,
    sample_live,
    shuffle_seed,
    stratum_quotas,
)

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


def _strata(sizes: list[int]) -> dict[str, int]:
    owner, n = {}, 0
    for worker, size in enumerate(sizes):
        for _ in range(size):
            owner[f"c{n:03d}"] = worker
            n += 1
    return owner


@pytest.mark.parametrize(
    ("sizes", "drawn", "expected"),
    [
        ([50, 50], 100, [50, 50]),
        ([30, 30], 10, [5, 5]),
        ([42, 58], 10, [4, 6]),
        ([1, 1, 1], 2, [1, 1, 0]),  # equal remainders: the earlier strata
        ([7, 3], 10, [7, 3]),
        ([100, 1], 5, [5, 0]),
    ],
)
def test_stratum_quotas_are_proportional_and_sum_to_the_draw(sizes, drawn, expected):
    quotas = stratum_quotas(sizes, drawn)
    assert quotas == expected
    assert sum(quotas) == drawn and all(q <= n for q, n in zip(quotas, sizes, strict=True))


def test_stratified_sampling_gives_each_worker_its_proportional_share_every_round():
    owner = _strata([20, 40])  # worker 1 hosts two thirds
    fed = Federation([], [], None, sorted(owner), owner)  # type: ignore[arg-type]
    for round_num in range(1, 40):
        grouped = fed.sample(round_num, 12, seed=3, sampling="stratified")
        assert {w: len(ids) for w, ids in grouped.items()} == {0: 4, 1: 8}
        assert all(owner[c] == w for w, ids in grouped.items() for c in ids)
    uniform = [len(fed.sample(r, 12, seed=3)[0]) for r in range(1, 40)]
    assert len(set(uniform)) > 1  # the shares uniform sampling gives vary by chance


def test_stratified_draws_every_client_of_a_worker_about_equally_often():
    owner = _strata([30, 30])
    counts = collections.Counter(
        c
        for r in range(1, 601)
        for c in sample_live(sorted(owner), owner, None, r, 10, 0, "stratified")
    )
    assert set(counts) == set(owner)
    # 600 rounds x 5 of each worker's 30: 100 each on average.
    assert min(counts.values()) > 60 and max(counts.values()) < 140


def test_stratified_sampling_is_deterministic_and_ignores_the_workers_order():
    owner = _strata([13, 29, 18])
    ids = sorted(owner)
    first = sample_live(ids, owner, None, 4, 15, 9, "stratified")
    assert first == sample_live(ids, owner, None, 4, 15, 9, "stratified")
    assert first != sample_live(ids, owner, None, 5, 15, 9, "stratified")
    renumbered = {c: 2 - w for c, w in owner.items()}
    assert first == sample_live(ids, renumbered, None, 4, 15, 9, "stratified")


def test_one_worker_stratified_is_exactly_uniform():
    owner = dict.fromkeys(IDS, 0)
    for round_num in range(1, 20):
        assert sample_live(IDS, owner, None, round_num, 10, 5, "stratified") == sample_clients(
            IDS, round_num, 10, 5
        )


def test_stratified_sampling_draws_only_from_live_workers():
    owner = _strata([10, 20, 30])
    drawn = sample_live(sorted(owner), owner, [0, 2], 7, 8, 1, "stratified")
    assert {owner[c] for c in drawn} == {0, 2}
    assert collections.Counter(owner[c] for c in drawn) == {0: 2, 2: 6}
    # Asked for more than the live workers host: every live client.
    everyone = sample_live(sorted(owner), owner, [0], 7, 50, 1, "stratified")
    assert everyone == sorted(c for c, w in owner.items() if w == 0)
