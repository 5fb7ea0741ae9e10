"""Executors kept for reuse stay within their budget, and padding stays bounded.

The policy is pure (`coordinator.rounds.executor_reuse`) and tested without
gRPC; one test checks that a real worker frees what the policy evicts.
"""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.rounds.executor_reuse import ExecutorReuse, likely_counts, padded_count


def test_padding_adds_at_most_a_quarter_and_never_shrinks():
    previous = 0
    for clients in range(1, 2000):
        padded = padded_count(clients)
        assert clients <= padded <= max(clients, 1.25 * clients), clients
        assert padded >= previous
        previous = padded
    assert [padded_count(n) for n in (8, 9, 11, 13, 17, 250)] == [8, 10, 12, 14, 20, 256]


def test_likely_counts_cover_the_mean_and_stay_possible():
    counts = likely_counts(clients_per_round=100, hosted=850, total=3400)
    assert 25 in counts and min(counts) >= 1 and max(counts) <= 100
    # A worker hosting everything always gets every sampled client.
    assert list(likely_counts(10, 60, 60)) == [10]


def test_target_reuses_a_kept_count_within_the_padding_limit():
    policy = ExecutorReuse(budget=1000)
    assert policy.target(9) == 10
    policy.use(12)
    assert policy.target(9) == 10  # 12 is more than padded_count(9)
    assert policy.target(11) == 12
    policy.use(11)
    assert policy.target(11) == 11  # the smallest kept count that fits
    assert ExecutorReuse(pad=False).target(9) == 9
    assert policy.target(0) == 0


def test_least_recently_used_are_evicted_and_the_one_in_use_never():
    policy = ExecutorReuse(budget=20)
    assert [policy.use(c) for c in (40, 3, 5)] == [[], [40], []]
    assert policy.kept() == {3, 5}
    policy.use(3)  # 5 is now the least recently used
    assert policy.use(16) == [5]
    assert policy.kept() == {3, 16}
    # The count in use stays even when it alone exceeds the budget.
    assert policy.use(30) == [3, 16]
    assert policy.kept() == {30}


def test_warm_up_counts_are_likeliest_first_and_fit_the_budget():
    policy = ExecutorReuse(budget=64)
    counts = policy.warm_up_counts(clients_per_round=100, hosted=850, total=3400)
    assert counts[0] in (24, 28) and sum(counts) <= 64
    assert all(c == padded_count(c) for c in counts)


@pytest.mark.parametrize("clients", [1, 7, 9, 100, 1000])
def test_padding_target_is_a_count_a_worker_can_run(clients):
    policy = ExecutorReuse()
    assert clients <= policy.target(clients) <= padded_count(clients)


def test_a_disposed_executor_is_gone_and_the_worker_keeps_serving(workers2):
    import tensorflow_federated as tff

    from coordinator.executor_client import PreparedComputation, RemoteWorker

    @tff.federated_computation(tff.FederatedType(np.int32, tff.CLIENTS))
    def count(values):
        return tff.federated_sum(values)

    comp = PreparedComputation(count, "count")
    worker = RemoteWorker(workers2[0].address, rpc_timeout=60)
    try:
        for clients in (40, 3, 7):
            assert worker.call(comp, [1] * clients, clients) == clients
        assert worker.client_counts() == {3, 40, 7}
        worker.dispose_executor(40)
        assert worker.client_counts() == {3, 7}
        assert not worker.is_loaded(comp, 40)
        # The worker still serves the kept executors and builds new ones.
        assert worker.call(comp, [2] * 7, 7) == 14
        assert worker.call(comp, [1] * 40, 40) == 40
    finally:
        worker.close()
