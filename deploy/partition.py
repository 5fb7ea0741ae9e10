"""Assigning whole writers to worker shards."""

from __future__ import annotations

import heapq

import numpy as np

from deploy.sources import FederatedSource


def balanced_writer_assignment(
    source: FederatedSource, num_shards: int, seed: int = 0
) -> list[list[int]]:
    """Client indices per shard, whole writers only, balanced by example count.

    Largest writers first, each to the currently lightest shard (LPT), which
    keeps shard totals within one writer of each other. The seed only breaks
    ties between equally sized writers, so the result is deterministic.
    """
    if num_shards < 1:
        raise ValueError(f"need at least one shard, got {num_shards}")
    if num_shards > len(source.clients):
        raise ValueError(
            f"{num_shards} shards for {len(source.clients)} writers: every shard needs "
            "at least one writer; use fewer workers"
        )
    sizes = np.array([c.num_train + c.num_test for c in source.clients])
    tiebreak = np.random.default_rng(seed).permutation(len(sizes))
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], tiebreak[i]))
    heap = [(0, shard) for shard in range(num_shards)]
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    for i in order:
        total, shard = heapq.heappop(heap)
        shards[shard].append(i)
        heapq.heappush(heap, (total + int(sizes[i]), shard))
    return [sorted(s) for s in shards]
