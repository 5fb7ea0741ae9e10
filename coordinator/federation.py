"""The federation as the coordinator sees it: workers, their clients, sampling.

The coordinator never opens a shard file. It learns what each worker hosts by
running a tiny computation on that worker which reads the worker's own
manifest and `worker.json`, then checks that the workers form one federation.
"""

from __future__ import annotations

import collections
import dataclasses
import fractions
import logging
import math
from collections.abc import Callable, Collection, Sequence
from concurrent import futures
from pathlib import Path
from typing import cast

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from coordinator.executor_client import PreparedComputation, RemoteWorker, WorkerError
from coordinator.executor_client.connection import ClientTLS
from coordinator.liveness import Liveness
from shared import shard_format, worker_dir
from shared.config import SAMPLINGS, STRATIFIED
from shared.errors import FederationError

log = logging.getLogger("fedcompose.coordinator")


@dataclasses.dataclass(frozen=True)
class WorkerDescription:
    address: str
    manifest: shard_format.Manifest
    info: worker_dir.WorkerInfo


def _describe_computation() -> tff.Computation:
    @tff.tensorflow.computation
    def describe() -> tuple[tf.Tensor, tf.Tensor]:
        # Relative paths resolve in the worker's working directory.
        return (
            tf.io.read_file(worker_dir.MANIFEST_PATH),
            tf.io.read_file(worker_dir.WORKER_INFO_NAME),
        )

    return describe


_DESCRIBE: PreparedComputation | None = None


def describe_worker(worker: RemoteWorker) -> WorkerDescription:
    global _DESCRIBE
    if _DESCRIBE is None:
        _DESCRIBE = PreparedComputation(_describe_computation(), "describe")
    try:
        # `describe` returns <string, string>, which TFF hands back as two bytes.
        manifest_bytes, info_bytes = cast(tuple[bytes, bytes], worker.call(_DESCRIBE, None))
    except WorkerError as e:
        if "NOT_FOUND" in str(e) or "No such file" in str(e) or "not found" in str(e).lower():
            raise WorkerError(
                worker.label,
                "is a TFF executor service but serves no fedcompose shard; "
                "start it with `fedcompose worker --shard DIR`",
            ) from None
        raise
    try:
        manifest = shard_format.Manifest.from_json(
            manifest_bytes, origin=f"{worker.label} manifest", checksums=False
        )
        del manifest_bytes
    except shard_format.ShardError as e:
        raise FederationError(f"worker {worker.label}: {e}") from None
    return WorkerDescription(worker.address, manifest, worker_dir.WorkerInfo.from_json(info_bytes))


def sample_clients(
    client_ids: Sequence[str], round_num: int, clients_per_round: int, seed: int
) -> list[str]:
    """A round's clients, uniformly without replacement; a pure function of its
    arguments, so a resumed run samples exactly what the original would have."""
    rng = np.random.default_rng([seed, round_num])
    chosen = np.sort(rng.choice(len(client_ids), size=clients_per_round, replace=False))
    return [client_ids[i] for i in chosen]


def stratum_quotas(sizes: Sequence[int], drawn: int, offset: float) -> list[int]:
    """How many of `drawn` clients each stratum of `sizes` clients gives: its
    proportional share `drawn * n / total` rounded down, plus one for the
    strata that systematic sampling at `offset` (in [0, 1)) picks among those
    with a remainder. Over a uniform `offset`, a stratum gets the extra client
    with chance equal to its remainder, so its expected quota is exactly its
    proportional share and every client's chance to be drawn is `drawn / total`.
    A fixed rounding (largest remainder) gave the same strata the extra client
    every round and left a stratum whose share rounded to 0 never drawn.
    The quotas sum to `drawn` and none exceeds its size."""
    total = sum(sizes)
    # Integers: remainders are numerators over `total`, exact whatever the sizes.
    quotas = [drawn * n // total for n in sizes]
    extra = drawn - sum(quotas)
    # Exact: a float offset near 1 put the last point past the end in floats.
    point = fractions.Fraction(offset) * total

    def below(end: int) -> int:
        # How many of the points `point + m * total` (m < extra), one per
        # `total` over [0, extra * total), lie below `end`.
        return min(extra, max(0, math.ceil((end - point) / total)))

    upper = 0
    for i, n in enumerate(sizes):
        # Remainders laid end to end; each is shorter than `total`, so it holds
        # at most one point, and the counts add up to `extra` exactly.
        lower, upper = upper, upper + drawn * n % total
        quotas[i] += below(upper) - below(lower)
    return quotas


def sample_stratified(
    strata: Sequence[Sequence[str]], round_num: int, clients_per_round: int, seed: int
) -> list[str]:
    """A round's clients drawn stratum by stratum: each stratum (a worker's
    sorted clients) gives its `stratum_quotas` share, at an offset drawn anew
    each round, uniformly without replacement within it. Strata are taken in
    the order of their first client id, so the draw depends on which clients
    share a worker, not on the workers' order; a pure function of its
    arguments, like `sample_clients`."""
    strata = sorted((sorted(s) for s in strata if s), key=lambda s: s[0])
    sizes = [len(s) for s in strata]
    drawn = min(clients_per_round, sum(sizes))
    # Its own stream, so the clients' draw uses the one `sample_clients` does
    # and one stratum draws exactly what uniform sampling draws.
    offset = float(np.random.default_rng([seed, round_num, 1]).random())
    rng = np.random.default_rng([seed, round_num])
    chosen: list[str] = []
    for stratum, quota in zip(strata, stratum_quotas(sizes, drawn, offset), strict=True):
        picks = np.sort(rng.choice(len(stratum), size=quota, replace=False))
        chosen.extend(stratum[i] for i in picks)
    return sorted(chosen)


def sample_live(
    client_ids: Sequence[str],
    client_worker: dict[str, int],
    live: Collection[int] | None,
    round_num: int,
    clients_per_round: int,
    seed: int,
    sampling: str = "uniform",
) -> list[str]:
    """A round's clients, drawn only from clients on live workers.

    The rule: the same uniform draw without replacement as `sample_clients`,
    over the sorted clients of the live workers instead of all clients, and
    of at most as many clients as they host. With every worker live it is
    exactly `sample_clients`, so a run without failures samples as before; while
    a worker is down, every live client's chance to be drawn rises from
    k/N to k/N_live and the down worker's clients are not drawn at all. A pure
    function of the seed, the round and the set of live workers: a run that
    meets the same failures at the same rounds samples the same clients.

    `sampling="stratified"` draws from each live worker's clients separately
    instead (`sample_stratified`): every worker gets a share proportional to
    the clients it hosts, so no worker's share is larger by chance.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling {sampling!r}: one of {', '.join(SAMPLINGS)}")
    if live is None:
        pool = list(client_ids)
    else:
        up = set(live)
        pool = [c for c in client_ids if client_worker[c] in up]
    if sampling == STRATIFIED:
        strata: dict[int, list[str]] = collections.defaultdict(list)
        for c in pool:
            strata[client_worker[c]].append(c)
        return sample_stratified(list(strata.values()), round_num, clients_per_round, seed)
    return sample_clients(pool, round_num, min(clients_per_round, len(pool)), seed)


def shuffle_seed(seed: int, round_num: int) -> int:
    """The seed each client shuffles its examples with in round `round_num`."""
    return seed * 1_000_003 + round_num


@dataclasses.dataclass
class Federation:
    workers: list[RemoteWorker]
    descriptions: list[WorkerDescription]
    task: shard_format.Task
    client_ids: list[str]
    """All hosted client ids, sorted."""
    client_worker: dict[str, int]
    """Index into `workers` of the worker hosting each client."""
    make_worker: Callable[[str, float], RemoteWorker] | None = None
    """A client for a worker address, with a per-call deadline: what `connect`
    made the workers with, used to probe workers that went down."""
    liveness: Liveness | None = None
    """Which workers are up; None: all, always (nothing tolerates failures)."""
    data: shard_format.DataFormat = shard_format.EMNIST_FORMAT
    """The examples' structure and encoding, equal on every worker (`check_consistency`)."""

    @property
    def num_clients(self) -> int:
        return len(self.client_ids)

    def clients_of(self, worker_index: int) -> list[str]:
        return [c.id for c in self.descriptions[worker_index].manifest.clients]

    def live(self) -> list[int]:
        """Indices of the workers that take part in rounds now."""
        if self.liveness is None:
            return list(range(len(self.workers)))
        return self.liveness.live()

    def sample(
        self,
        round_num: int,
        clients_per_round: int,
        seed: int,
        live: Collection[int] | None = None,
        sampling: str = "uniform",
    ) -> dict[int, list[str]]:
        """Clients of a round, grouped by worker, drawn from the `live` workers'
        clients (all workers' when None); see `sample_live`."""
        by_worker: dict[int, list[str]] = collections.defaultdict(list)
        for cid in sample_live(
            self.client_ids,
            self.client_worker,
            live,
            round_num,
            clients_per_round,
            seed,
            sampling,
        ):
            by_worker[self.client_worker[cid]].append(cid)
        return dict(by_worker)

    def probe(self, index: int, timeout: float) -> WorkerDescription:
        """Reaches worker `index` on a fresh channel of its own (its round
        channel may hold abandoned calls) and reads what it serves."""
        assert self.make_worker is not None
        worker = self.make_worker(self.descriptions[index].address, timeout)
        try:
            # Refused: nothing listens there yet; the next probe comes after back-off.
            worker.wait_ready(timeout, retry_refused=False)
            return describe_worker(worker)
        finally:
            worker.close()

    def watch(
        self, probe_interval: float, probe_interval_max: float, view_path: Path | None = None
    ) -> Liveness:
        """Starts tracking which workers are up: from now on, a worker lost in a
        round is probed in the background and taken back when it returns."""
        probe_timeout = min(10.0, max(2.0, probe_interval_max / 3))
        if self.liveness is not None:  # the previous training's, in a sweep
            self.liveness.stop()
        self.liveness = Liveness(
            self.descriptions,
            lambda i: self.probe(i, probe_timeout),
            probe_interval=probe_interval,
            probe_interval_max=probe_interval_max,
            view_path=view_path,
        )
        return self.liveness

    def close(self) -> None:
        if self.liveness is not None:
            self.liveness.stop()
        for worker in self.workers:
            worker.close()


def check_consistency(descriptions: Sequence[WorkerDescription]) -> shard_format.Task:
    """Returns the common task; raises `FederationError` naming the conflict."""
    first = descriptions[0]
    for other in descriptions[1:]:
        if other.manifest.data != first.manifest.data:
            raise FederationError(
                f"workers serve examples of different element specs: {first.address} has "
                f"{first.manifest.data.describe()}, {other.address} has "
                f"{other.manifest.data.describe()}; every worker must serve a shard of the "
                "same data, built by one `fedcompose data` run"
            )
        if other.manifest.task != first.manifest.task:
            raise FederationError(
                f"workers serve different tasks: {first.address} has "
                f"{first.manifest.task.describe()}, {other.address} has "
                f"{other.manifest.task.describe()}; every worker must serve a shard of "
                "the same dataset"
            )
        if other.manifest.build_id != first.manifest.build_id:
            raise FederationError(
                f"workers serve shards of different builds: {first.address} has build "
                f"{first.manifest.build_id}, {other.address} has build "
                f"{other.manifest.build_id}; serve shards made by one `fedcompose data` run"
            )
    owner: dict[str, str] = {}
    for d in descriptions:
        for client in d.manifest.clients:
            if client.id in owner:
                raise FederationError(
                    f"client {client.id!r} is hosted twice, by {owner[client.id]} and by "
                    f"{d.address}; each client must live on exactly one worker"
                )
            owner[client.id] = d.address
    versions = {d.info.tff_version for d in descriptions}
    if len(versions) > 1:
        log.warning("workers run different TFF versions: %s", ", ".join(sorted(versions)))
    return first.manifest.task


def connect(
    addresses: Sequence[str],
    *,
    rpc_timeout: float,
    connect_timeout: float,
    tls: ClientTLS | None = None,
) -> Federation:
    """Reaches every worker (in parallel), reads what it hosts, checks the whole.
    With `tls`, every channel is mutual TLS with the coordinator's kit."""
    if not addresses:
        raise FederationError("no worker addresses given")
    if len(set(addresses)) != len(addresses):
        dup = next(a for a in addresses if list(addresses).count(a) > 1)
        raise FederationError(f"worker address {dup} is listed twice")

    def make_worker(address: str, timeout: float = rpc_timeout) -> RemoteWorker:
        return RemoteWorker(
            address,
            rpc_timeout=timeout,
            connect_timeout=min(timeout, connect_timeout),
            tls=tls,
        )

    workers = [make_worker(a) for a in addresses]
    try:
        with futures.ThreadPoolExecutor(len(workers)) as pool:
            list(pool.map(lambda w: w.wait_ready(), workers))
            descriptions = list(pool.map(lambda w: describe_worker(w), workers))
        task = check_consistency(descriptions)
    except BaseException:
        for w in workers:
            w.close()
        raise
    client_worker = {c.id: i for i, d in enumerate(descriptions) for c in d.manifest.clients}
    return Federation(
        workers=workers,
        descriptions=descriptions,
        task=task,
        client_ids=sorted(client_worker),
        client_worker=client_worker,
        make_worker=make_worker,
        data=descriptions[0].manifest.data,
    )
