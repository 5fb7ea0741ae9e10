"""Executors kept for reuse stay within their budget, and padding stays bounded.

The policy (`coordinator.rounds.executor_reuse`) is tested without gRPC, freeing
executors on a fake worker that keeps count of them; one test checks that a real
worker frees what the policy evicts.
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


class FakeWorker:
    """A worker's executors by client count: built by a call, freed only when
    the policy says (freeing one it does not have fails the test)."""

    def __init__(self) -> None:
        self.executors: set[int] = set()
        self.disposed: list[int] = []

    def dispose_executor(self, num_clients: int) -> None:
        self.executors.remove(num_clients)
        self.disposed.append(num_clients)

    def run(self, counts: list[int]) -> None:
        self.executors |= set(counts)


def test_sampled_rounds_keep_the_worker_within_the_budget_and_in_step():
    rng = np.random.default_rng(0)
    policy, worker = ExecutorReuse(budget=96), FakeWorker()
    per_call = 40
    for clients in rng.hypergeometric(250, 750, 100, size=300):
        counts = [count for _, count in policy.pieces(int(clients), per_call)]
        policy.make_room(worker, counts)
        worker.run(counts)
        assert worker.executors == policy.kept()
        assert sum(worker.executors) <= 96
    # Reuse, not one executor per sampled count: few were ever built.
    assert len(set(worker.disposed)) + len(worker.executors) < 20


def test_a_share_in_pieces_keeps_its_main_count_longest():
    policy, worker = ExecutorReuse(budget=24, pad=False), FakeWorker()
    policy.make_room(worker, [8, 8, 5])  # two calls of 8 clients, then one of 5
    worker.run([8, 5])
    policy.make_room(worker, [12])  # 8 + 5 + 12 > 24: the less recent, 5, goes
    assert worker.disposed == [5] and worker.executors == {8} == policy.kept() - {12}


def test_a_worker_that_lost_its_executors_is_not_told_to_free_them():
    policy, worker = ExecutorReuse(budget=16), FakeWorker()
    policy.make_room(worker, [10])
    worker.run([10])
    policy.forget()
    worker.executors.clear()  # the worker restarted
    policy.make_room(worker, [12])
    worker.run([12])
    assert worker.disposed == [] and worker.executors == {12} == policy.kept()


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
