"""Executors kept for reuse stay within their budget, and padding stays bounded."""

from __future__ import annotations

import numpy as np
import tensorflow_federated as tff

from coordinator import remote, rounds


def test_padding_adds_at_most_a_quarter_and_never_shrinks():
    previous = 0
    for clients in range(1, 2000):
        padded = rounds.padded_count(clients)
        assert clients <= padded <= max(clients, 1.25 * clients), clients
        assert padded >= previous
        previous = padded
    assert [rounds.padded_count(n) for n in (8, 9, 11, 13, 17, 250)] == [8, 10, 12, 14, 20, 256]


def test_likely_counts_cover_the_mean_and_stay_possible():
    counts = rounds.likely_counts(clients_per_round=100, hosted=850, total=3400)
    assert 25 in counts and min(counts) >= 1 and max(counts) <= 100
    # A worker hosting everything always gets every sampled client.
    assert list(rounds.likely_counts(10, 60, 60)) == [10]


def test_released_executors_leave_the_budget_and_the_worker_keeps_serving(workers2):
    @tff.federated_computation(tff.FederatedType(np.int32, tff.CLIENTS))
    def count(values):
        return tff.federated_sum(values)

    comp = remote.PreparedComputation(count, "count")
    worker = remote.RemoteWorker(workers2[0].address, rpc_timeout=60)
    try:
        for clients in (40, 3, 5, 7):
            assert worker.call(comp, [1] * clients, clients) == clients
        assert worker.client_counts() == {3, 5, 40, 7}

        # 40 is the least recently used; dropping it leaves 3 + 5 + 7 <= 20.
        worker.release_executors(keep=7, budget=20)
        assert worker.client_counts() == {3, 5, 7}
        # The executor kept is never dropped, even beyond the budget.
        worker.release_executors(keep=7, budget=0)
        assert worker.client_counts() == {7}
        assert not worker.is_loaded(comp, 40)

        # The worker still serves the kept executor and builds new ones.
        assert worker.call(comp, [2] * 7, 7) == 14
        assert worker.call(comp, [1] * 40, 40) == 40
    finally:
        worker.close()
