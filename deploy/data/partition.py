"""Dealing a federated source's examples to clients and its clients to shards.

`natural` keeps the source's writers. `iid` and `dirichlet` re-deal the same
examples to as many synthetic clients as there are writers, each with a
writer's numbers of train and test examples, to simulate other settings on the
same data. Train and test examples are dealt from separate pools, so an
example held out in the source stays held out. Then whole clients go to shards.
Everything is seeded: the same source and seed give the same result.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

from deploy.data.sources import ExamplePool, FederatedSource, PooledClient
from shared.errors import UsageError

SCHEMES = ("natural", "iid", "dirichlet")


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
        raise UsageError(
            f"--workers {num_shards} is more than the {len(source.clients)} writers of the "
            "data: every worker's shard needs at least one writer; use fewer --workers"
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


def repartition(
    source: FederatedSource, scheme: str, alpha: float = 0.5, seed: int = 0
) -> FederatedSource:
    """The source's clients under `scheme` (one of `SCHEMES`)."""
    if scheme == "natural":
        return source
    if scheme == "iid":
        return iid_resplit(source, seed)
    if scheme == "dirichlet":
        return dirichlet_resplit(source, alpha, seed)
    raise ValueError(f"unknown partition {scheme!r}; choose one of {', '.join(SCHEMES)}")


def iid_resplit(source: FederatedSource, seed: int = 0) -> FederatedSource:
    """All examples dealt uniformly at random, writer sizes kept."""
    rng = np.random.default_rng(seed)
    train, test = source.pooled("train"), source.pooled("test")
    train_rows = _deal_uniformly(len(train), [c.num_train for c in source.clients], rng)
    test_rows = _deal_uniformly(len(test), [c.num_test for c in source.clients], rng)
    return _synthetic_source(
        source,
        prefix="iid",
        pools=(train, test),
        rows=(train_rows, test_rows),
        how=f"re-dealt IID (seed {seed})",
    )


def dirichlet_resplit(source: FederatedSource, alpha: float, seed: int = 0) -> FederatedSource:
    """All examples re-dealt so that each client's label mix follows a Dirichlet.

    Client mixes are drawn from Dirichlet(alpha * K * p), p being the training
    label distribution over K classes: for balanced labels that is the usual
    Dirichlet(alpha), and with EMNIST's 62 unbalanced classes rare letters stay
    rare instead of being asked for more often than they exist. A client's
    test examples follow its own mix, so held-out accuracy measures the
    client's own distribution. When a class runs out a mix is renormalised
    over the classes left, so every example is dealt exactly once; the last
    clients dealt absorb what remains.
    """
    if not alpha > 0:
        raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    train, test = source.pooled("train"), source.pooled("test")
    mixes = _label_mixes(train.labels, source.num_classes, alpha, len(source.clients), rng)
    train_sizes = [c.num_train for c in source.clients]
    test_sizes = [c.num_test for c in source.clients]
    train_rows = _deal_by_mix(train.labels, source.num_classes, train_sizes, mixes, rng)
    test_rows = _deal_by_mix(test.labels, source.num_classes, test_sizes, mixes, rng)
    return _synthetic_source(
        source,
        prefix="dir",
        pools=(train, test),
        rows=(train_rows, test_rows),
        how=f"re-dealt with Dirichlet(alpha={alpha}) label mixes (seed {seed})",
    )


def _deal_uniformly(
    pool_size: int, sizes: Sequence[int], rng: np.random.Generator
) -> list[np.ndarray]:
    assert sum(sizes) == pool_size, "client sizes must add up to the pool"
    return np.split(rng.permutation(pool_size), np.cumsum(sizes)[:-1])


def _label_mixes(
    labels: np.ndarray, num_classes: int, alpha: float, num_clients: int, rng: np.random.Generator
) -> np.ndarray:
    prior = np.bincount(labels, minlength=num_classes)[:num_classes] / max(1, len(labels))
    present = prior > 0
    mixes = np.zeros((num_clients, num_classes))
    if present.any():
        mixes[:, present] = _dirichlet(rng, alpha, present.sum(), prior[present], num_clients)
    # Tiny concentrations can underflow to NaN; such a client simply takes
    # whatever classes are left (see _draw_class_counts).
    return np.nan_to_num(mixes, nan=0.0)


_SLOW_DIRICHLET = 1e-6
"""Below this concentration numpy's Dirichlet sampler (rejection sampling of
Betas) takes time inversely proportional to it: 1e-7 takes minutes for
EMNIST's 3,400 clients, 1e-12 never ends."""


def _dirichlet(
    rng: np.random.Generator, alpha: float, classes: int, prior: np.ndarray, size: int
) -> np.ndarray:
    """`size` draws of Dirichlet(alpha * classes * prior): `rng.dirichlet`
    (bit for bit as before, so shards built earlier rebuild the same), and for tiny
    concentrations the same distribution drawn in log space, where nothing
    underflows: Gamma(a) = Gamma(a + 1) * U**(1/a), normalised with a softmax
    (nearly one class per client, as such an alpha means)."""
    concentration = alpha * classes * prior
    if concentration.min() >= _SLOW_DIRICHLET:
        return rng.dirichlet(concentration, size=size)
    shape, base = (size, len(prior)), classes * prior
    log_gamma_1 = np.log(rng.standard_gamma(concentration + 1.0, size=shape))
    # log(U) / (alpha * base), with U in (0, 1]; each row shifted to a maximum
    # of 0 before dividing by alpha, which may be as small as a float gets.
    scaled = np.log(1.0 - rng.uniform(size=shape)) / base
    scaled -= scaled.max(axis=1, keepdims=True)
    with np.errstate(divide="ignore", over="ignore"):
        log_gamma = scaled / alpha + log_gamma_1
    log_gamma -= log_gamma.max(axis=1, keepdims=True)
    weights = np.exp(log_gamma)
    return weights / weights.sum(axis=1, keepdims=True)


def _deal_by_mix(
    labels: np.ndarray,
    num_classes: int,
    sizes: Sequence[int],
    mixes: np.ndarray,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    assert sum(sizes) == len(labels), "client sizes must add up to the pool"
    if labels.size and not 0 <= labels.min() <= labels.max() < num_classes:
        raise ValueError(f"labels must lie in 0..{num_classes - 1} to be dealt by class")
    by_class = [rng.permutation(np.flatnonzero(labels == k)) for k in range(num_classes)]
    taken = np.zeros(num_classes, dtype=np.int64)
    left = np.array([len(rows) for rows in by_class], dtype=np.int64)
    dealt = []
    for size, mix in zip(sizes, mixes, strict=True):
        counts = _draw_class_counts(size, mix, left, rng)
        parts = [by_class[k][taken[k] : taken[k] + counts[k]] for k in np.flatnonzero(counts)]
        taken += counts
        left -= counts
        rows = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        # Shuffled, so that a client's file is not sorted by label.
        dealt.append(rng.permutation(rows))
    return dealt


def _draw_class_counts(
    size: int, mix: np.ndarray, left: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """How many examples of each class a client of `size` with label `mix` gets."""
    counts = np.zeros_like(left)
    while (need := size - int(counts.sum())) > 0:
        room = left - counts
        weights = np.where(room > 0, mix, 0.0)
        if not weights.sum() > 0:
            weights = (room > 0).astype(float)
        # Every class drawn has room, so each pass adds at least one example.
        counts += np.minimum(rng.multinomial(need, weights / weights.sum()), room)
    return counts


def _synthetic_source(
    source: FederatedSource,
    prefix: str,
    pools: tuple[ExamplePool, ExamplePool],
    rows: tuple[list[np.ndarray], list[np.ndarray]],
    how: str,
) -> FederatedSource:
    train, test = pools
    train_rows, test_rows = rows
    width = max(4, len(str(len(train_rows) - 1)))
    clients = [
        PooledClient(
            id=f"{prefix}-{j:0{width}d}",
            train_pool=train,
            train_rows=train_rows[j],
            test_pool=test,
            test_rows=test_rows[j],
        )
        for j in range(len(train_rows))
    ]
    return FederatedSource(
        dataset=source.dataset,
        num_classes=source.num_classes,
        clients=clients,
        description=f"{source.description}; {how} into {len(clients)} synthetic clients",
        writers_left_out=source.writers_left_out,
        examples_left_out=source.examples_left_out,
    )
