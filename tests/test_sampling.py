"""Client sampling is a pure, seeded function: uniform without replacement,
grouped by the worker hosting each client, the same in every run."""

from __future__ import annotations

import collections
import itertools
from fractions import Fraction

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
        ([7, 3], 10, [7, 3]),
        ([20, 40], 12, [4, 8]),
    ],
)
@pytest.mark.parametrize("offset", [0.0, 0.5, 1 - 2**-53])
def test_whole_shares_are_exact_at_any_offset(sizes, drawn, expected, offset):
    assert stratum_quotas(sizes, drawn, offset) == expected


def test_rounded_shares_are_right_on_average_over_the_offset():
    # A share kN_w/N that is not whole is rounded up with chance equal to its
    # remainder: offsets evenly spread over [0, 1), one per N, average to the
    # exact share, so every client's chance to be drawn is k/N. (A fixed
    # rounding gave [1, 1, 0] for three workers of 20 and k = 2 every round:
    # the third worker's clients were never drawn.)
    for sizes in itertools.product(range(1, 7), repeat=3):
        total = sum(sizes)
        for drawn in range(1, total + 1):
            summed = [0, 0, 0]
            for j in range(total):
                quotas = stratum_quotas(list(sizes), drawn, (j + 0.5) / total)
                assert sum(quotas) == drawn, (sizes, drawn, quotas)
                for i, (q, n) in enumerate(zip(quotas, sizes, strict=True)):
                    assert drawn * n // total <= q <= -(-drawn * n // total) and q <= n
                    summed[i] += q
            assert [Fraction(x, total) for x in summed] == [
                Fraction(drawn * n, total) for n in sizes
            ], (sizes, drawn)
    # Offsets next to 1 once lost a client to float rounding.
    assert stratum_quotas([1, 1, 2], 3, 1 - 2**-53) == [0, 1, 2]


def test_no_worker_is_left_out_by_rounding():
    owner = _strata([20, 20, 20])
    counts = collections.Counter(
        owner[c]
        for r in range(1, 301)
        for c in sample_live(sorted(owner), owner, None, r, 2, 0, "stratified")
    )
    # 300 rounds x 2 clients: 200 a worker on average.
    assert all(150 < counts[w] < 250 for w in range(3)), counts


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


def test_an_unknown_sampling_is_refused_not_drawn_uniformly():
    # A misspelt name (a bench child's config, a caller of the API) must not
    # quietly give uniform draws labelled as another scheme.
    owner = _strata([3, 3])
    with pytest.raises(ValueError, match="Stratified"):
        sample_live(sorted(owner), owner, None, 1, 2, 0, "Stratified")
