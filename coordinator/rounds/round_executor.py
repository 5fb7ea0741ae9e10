"""Training rounds and evaluations of one algorithm over a federation.

`RoundExecutor` samples nothing and decides nothing about the algorithm: it
turns a round's sampled clients into padded client tokens per worker
(`executor_reuse`), runs the composed `next` in its mergeable form across the
workers (`mergeable`), and returns the new state with metrics, timing and
bytes on the wire (`timing`).

Workers can fail in a round. One that does (or misses the round deadline) is
dropped from it: the coordinator abandons its calls, marks it down (the
federation's `Liveness` probes it from then on), and the round finishes with
the partials that made it if they cover the clients the caller requires,
else `RoundIncomplete` is raised (the caller retries). A worker that comes
back is reset and warmed up in the background before it rejoins (`_rejoin`,
then `admit_rejoining`): new channel, its old executors freed, its
executor-reuse policy forgotten, and its executors for the round size built
again while the others' rounds go on, so that its first round costs them
nothing and a fault in that window costs no round.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from concurrent import futures
from typing import Protocol, cast

from tensorflow_federated.proto.v0 import executor_pb2

from coordinator.executor_client import (
    RemoteWorker,
    WireStats,
    WorkerError,
)
from coordinator.executor_client.server import ServerExecutor
from coordinator.federation import Federation
from coordinator.rounds import outputs
from coordinator.rounds.executor_reuse import EXECUTOR_BUDGET, ExecutorReuse, MemoryPlan
from coordinator.rounds.mergeable import FUSED_CLIENTS, MergeableRunner, MergeOutcome, NotEnough
from coordinator.rounds.prepared import FUSED, PreparedAlgorithm
from coordinator.rounds.timing import RoundResult, RoundTiming
from shared import pause_points, preprocessing
from shared.errors import FederationError

log = logging.getLogger("fedcompose.coordinator")


class RoundIncomplete(FederationError):
    """Too few of a round's sampled clients made it into its result."""

    def __init__(self, message: str, lost: dict[str, str]):
        super().__init__(message)
        self.lost = lost


WARM_UP_PROGRESS_MIN = 30.0
"""Seconds a worker may take to build one executor ahead, whatever the round
deadline: the first ones build TensorFlow graphs for every computation, which
took over 3 s per worker with three workers warming up at once on 2 cores."""


REJOIN_WARM_UP_COUNTS = 4
"""Executors built for a rejoining worker before it joins: the likeliest client
counts only (about 86 % of its rounds with 3 workers of 20 clients and 10 per
round). All of them (8 there) took 9 to 39 s on a loaded 2-core machine, the
worker out all along; a rarer count is built in the round that meets it."""


def _log_share_kind(algorithm: PreparedAlgorithm, wanted: bool, fused: bool) -> None:
    """Says once per run how a worker's share of a round runs, and if not
    fused, why."""
    if fused:
        log.info("training: one TensorFlow call per worker per round (fused share)")
        return
    if not wanted:
        why = "the fused share is turned off"
    elif algorithm.user_defined:
        why = "a user's process is not fused"
    else:
        why = algorithm.fused_note or "no fused share was built"
    log.info("training: TensorFlow calls per client, not fused (%s)", why)


def required_clients(clients_per_round: int, min_coverage: float) -> int:
    """Clients a round must include to be applied: `min_coverage` of the
    configured round size, at least one."""
    return max(1, math.ceil(min_coverage * clients_per_round - 1e-9))


class _ProcessOutput(Protocol):
    """What `next` of a learning or an evaluation process returns
    (`LearningProcessOutput`)."""

    state: object
    metrics: object


@dataclasses.dataclass
class _KnownState:
    """A state a round returned, with its serialized form, so that the next
    round sends the same bytes instead of serializing it again."""

    value: object
    proto: executor_pb2.Value


class RoundExecutor:
    """Drives training rounds and evaluations of one algorithm over a federation."""

    def __init__(
        self,
        algorithm: PreparedAlgorithm,
        federation: Federation,
        server: ServerExecutor,
        pad_clients: bool = True,
        executor_budget: int = EXECUTOR_BUDGET,
        memory: MemoryPlan | None = None,
        fused: bool = True,
    ):
        self.algorithm = algorithm
        self.memory = memory or MemoryPlan(0, 0.0, None)
        """How many clients a worker runs in one call (its memory budget)."""
        # Empty clients change no example-weighted sum but do change anything
        # that counts clients (an unweighted mean, DP, adaptive clipping or
        # zeroing): pad only when the aggregator has nothing of the kind.
        pad_clients = pad_clients and algorithm.empty_clients_harmless
        fused_share = algorithm.computations.get(FUSED) if fused else None
        if fused_share is not None:
            # A fused call runs at one client count whatever its clients: no
            # executor to reuse, nothing to pad for.
            pad_clients = False
        _log_share_kind(algorithm, fused, fused_share is not None)
        self.reuse = [ExecutorReuse(executor_budget, pad_clients) for _ in federation.workers]
        self.federation = federation
        self.server = server
        comps = algorithm.computations
        self._train = MergeableRunner(algorithm.parts("train"), "train", fused_share)
        # A user's process without a model to evaluate has no evaluation.
        self._eval = (
            MergeableRunner(algorithm.parts("eval"), "eval") if algorithm.evaluates else None
        )
        self._initialize = comps["initialize"]
        self._eval_initialize = comps.get("eval.initialize")
        self._get_weights = comps["get_model_weights"]
        self._eval_set_weights = comps.get("eval.set_model_weights")
        # Twice the workers: calls abandoned in one round (ending once their
        # channel is closed) never hold up the next round's.
        self._pool = futures.ThreadPoolExecutor(
            max(2, 2 * len(federation.workers)), thread_name_prefix="worker-call"
        )
        self._known: _KnownState | None = None
        self._warmed: list[set[int]] = [set() for _ in federation.workers]
        """Per worker, the numbers of clients per round it has built executors for."""
        self._calls: dict[int, list[futures.Future]] = {}
        """Per worker, its calls of the last round: a worker rejoins only once
        they have all ended (calls abandoned on a closed channel end at once),
        so none of them can reach the new channel."""
        self._rejoin_pool = futures.ThreadPoolExecutor(
            len(federation.workers), thread_name_prefix="rejoin-call"
        )
        """Warm-up calls of rejoining workers: never queued behind a round's calls."""
        self._rejoins: dict[int, threading.Thread] = {}
        self._rejoin_lock = threading.Lock()
        self._closed = threading.Event()
        self._last_round: tuple[executor_pb2.Value, int, float | None] | None = None
        """The last round's state, clients per round and deadline: what a
        rejoining worker is warmed up with."""
        self._round_size = 0
        """Clients per round the run asks for (`admit_rejoining`)."""

    def close(self) -> None:
        self._closed.set()
        self._known = None
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._rejoin_pool.shutdown(wait=False, cancel_futures=True)

    def _peers(self) -> dict[str, RemoteWorker]:
        peers = {f"worker{i}": w for i, w in enumerate(self.federation.workers)}
        peers["server"] = self.server.worker
        return peers

    def _wire(self) -> dict[str, WireStats]:
        return {label: w.stats.snapshot() for label, w in self._peers().items()}

    def initialize(self) -> object:
        return self.server.worker.call(self._initialize, None)

    def model_weights(self, state: object) -> object:
        return self.server.worker.call(self._get_weights, state)

    def _state_proto(self, state: object) -> executor_pb2.Value:
        known = self._known
        # Identity, not equality: the state the last round returned, handed
        # back unchanged, as the trainer does. States are never mutated in place.
        if known is not None and known.value is state:
            return known.proto
        self._known = None
        return self._train.up_to_merge.serialize_element(0, state)

    def _named(self, index: int, reason: str) -> str:
        """`reason` for losing worker `index`, with the worker's address in it."""
        address = self.federation.workers[index].address
        return reason if address in reason else f"worker {address}: {reason}"

    def _pieces(self, index: int, tokens: list[str], evaluation: bool = False) -> list[list[str]]:
        """The worker's tokens as the calls it runs them in: at most the memory
        plan's clients per call each, padded with empty clients to the count
        its executor-reuse policy runs them at. Empty clients go last: sums
        over the real clients come out bit for bit as without them."""
        pieces, start = [], 0
        per_call = self.memory.eval_clients_per_call if evaluation else self.memory.clients_per_call
        for real, count in self.reuse[index].pieces(len(tokens), per_call):
            piece = tokens[start : start + real]
            start += real
            pieces.append(piece + [preprocessing.EMPTY_CLIENT_TOKEN] * (count - real))
        return pieces

    def _make_room_for(self, index: int, pieces: list[list[str]], runner: MergeableRunner) -> None:
        """Frees the worker's executors its policy evicts to make room for `pieces`."""
        counts = [runner.count(p) for p in pieces]
        self.reuse[index].make_room(self.federation.workers[index], counts)

    def warm_up(
        self,
        state_proto: executor_pb2.Value,
        clients_per_round: int,
        indices: list[int],
        phase_timeout: float | None = None,
        pool: futures.ThreadPoolExecutor | None = None,
        max_counts: int | None = None,
        total: int | None = None,
    ) -> dict[int, str]:
        """Builds, on the given workers at once, the executors for the (padded)
        client counts that sampling `clients_per_round` clients will likely give
        each; returns the workers that failed or missed `phase_timeout`.

        Each costs the worker tens to hundreds of milliseconds once, instead of
        in some round later on; a round that still meets a new count builds its
        executor then, as without warm-up.
        """
        total = total or self.federation.num_clients
        progress = {i: time.monotonic() for i in indices}

        def warm(index: int) -> None:
            worker = self.federation.workers[index]
            hosted = len(self.federation.descriptions[index].manifest.clients)
            per_call = self.memory.clients_per_call
            counts = self.reuse[index].warm_up_counts(clients_per_round, hosted, total, per_call)
            if self._train.fused is not None:
                counts = [FUSED_CLIENTS]
            for clients in counts[:max_counts]:
                if not worker.is_loaded(self._train.after_merge, clients):
                    self.reuse[index].make_room(worker, [clients])
                    self._train.warm_up(worker, state_proto, clients)
                progress[index] = time.monotonic()
            self._warmed[index].add(clients_per_round)

        # Each executor built must take less than the deadline: a worker that
        # makes no progress for that long is dropped.
        calls = {(pool or self._pool).submit(warm, i): i for i in indices}
        for future, index in calls.items():
            self._track(index, future)
        lost: dict[int, str] = {}
        pending = set(calls)
        while pending:
            if phase_timeout is not None:
                now = time.monotonic()
                late = {f for f in pending if now - progress[calls[f]] >= phase_timeout}
                for f in late:
                    lost[calls[f]] = (
                        f"no progress for {phase_timeout:g}s building its executors ahead; "
                        "dropped from the round"
                    )
                pending -= late
                if not pending:
                    break
            timeout = (
                None
                if phase_timeout is None
                else min(progress[calls[f]] for f in pending) + phase_timeout - time.monotonic()
            )
            done, pending = futures.wait(
                pending, timeout=max(0.0, timeout) if timeout is not None else None,
                return_when=futures.FIRST_COMPLETED,
            )  # fmt: skip
            for future in done:
                try:
                    future.result()
                except WorkerError as e:
                    lost[calls[future]] = str(e)
        return lost

    def _track(self, index: int, future: futures.Future) -> None:
        calls = [f for f in self._calls.get(index, []) if not f.done()]
        self._calls[index] = [*calls, future]

    def _lose(self, lost: dict[int, str]) -> None:
        """Drops workers lost in a round: their calls are abandoned now, and the
        federation probes them until they come back."""
        for index, reason in lost.items():
            self.federation.workers[index].abandon(reason)
            if self.federation.liveness is not None:
                self.federation.liveness.mark_down(index, reason)

    def admit_rejoining(self, clients_per_round: int | None = None) -> list[int]:
        """Takes back the workers that came back serving their shard and have
        been warmed up (`_rejoin`), and starts warming up those that answered
        and are not yet being warmed up, for rounds of `clients_per_round`
        clients (None: as many as the last round). Called between rounds only."""
        liveness = self.federation.liveness
        if liveness is None:
            return []
        if clients_per_round is not None:
            self._round_size = clients_per_round
        if liveness.on_answer is None:
            # From now on a worker is warmed up as soon as it answers.
            liveness.on_answer = self._begin_rejoin
        for index in liveness.rejoining():
            self._begin_rejoin(index)
        admitted = []
        for index in liveness.take_rejoining():
            liveness.mark_up(index)
            admitted.append(index)
        return admitted

    def _begin_rejoin(self, index: int) -> None:
        with self._rejoin_lock:
            thread = self._rejoins.get(index)
            if self._closed.is_set() or (thread is not None and thread.is_alive()):
                return
            thread = threading.Thread(
                target=self._rejoin, args=(index,), name=f"rejoin-{index}", daemon=True
            )
            self._rejoins[index] = thread
            thread.start()

    def _rejoin(self, index: int) -> None:
        """Resets what is known of a worker that answered again, and builds its
        executors for the round size, off the round path; then it is ready to
        join (or down again, if that failed).

        Whatever it held is gone (a restart) or stale (a stop): the channel is
        new (once its calls of the last round have ended, so that none reaches
        the new one), its old executors are freed, executor reuse starts over.
        """
        liveness = self.federation.liveness
        assert liveness is not None
        worker = self.federation.workers[index]
        try:
            while not all(call.done() for call in self._calls.get(index, [])):
                # Abandoned calls end at once; any other has its own deadline.
                if self._closed.wait(0.2):
                    return
            started = time.perf_counter()
            worker.dispose_stale(worker.reconnect())
            self.reuse[index].forget()
            self._warmed[index].clear()
            last = self._last_round
            if last is None:  # no round yet: the first one warms it up with the others
                liveness.mark_ready(index)
                return
            state_proto, clients_per_round, round_timeout = last
            # The counts it will likely run at are those of a draw from the
            # clients of the workers up and its own (alone, it runs them all).
            live = set(self.federation.live()) | {index}
            hosted = sum(len(self.federation.clients_of(i)) for i in live)
            clients_per_round = min(self._round_size or clients_per_round, hosted)
            deadline = None if round_timeout is None else max(round_timeout, WARM_UP_PROGRESS_MIN)
            lost = self.warm_up(
                state_proto,
                clients_per_round,
                [index],
                deadline,
                pool=self._rejoin_pool,
                max_counts=REJOIN_WARM_UP_COUNTS,
                total=hosted,
            )
            if self._closed.is_set():
                return
            if lost:
                worker.abandon(lost[index])
                liveness.rejoin_failed(index, lost[index])
                return
            liveness.mark_ready(index, f"{time.perf_counter() - started:.1f}s")
        except Exception as e:  # never lose a worker to a bug here silently
            if self._closed.is_set():
                return
            log.warning("warming up worker %s failed", worker.address, exc_info=True)
            worker.abandon(str(e))
            liveness.rejoin_failed(index, str(e) or type(e).__name__)

    def train_round(
        self,
        state: object,
        sampled: dict[int, list[str]],
        shuffle_seed: int,
        *,
        round_num: int = 0,
        required: int | None = None,
        round_timeout: float | None = None,
    ) -> RoundResult:
        """Runs one round on the sampled clients.

        `required`: clients the result must include (default: every sampled
        one, so that any lost worker fails the round); `round_timeout`: seconds
        the workers have to deliver (and, again, the finisher to finish).
        Raises `RoundIncomplete` when too few clients made it; lost workers
        are dropped (`_lose`) either way.
        """
        wire_before = self._wire()
        timing = RoundTiming()
        started = time.perf_counter()
        state_proto = self._state_proto(state)
        clients_per_round = sum(len(ids) for ids in sampled.values())
        needed = clients_per_round if required is None else required
        self._last_round = (state_proto, clients_per_round, round_timeout)
        cold = [i for i in sorted(sampled) if clients_per_round not in self._warmed[i]]
        lost: dict[int, str] = {}
        if cold:
            t0 = time.perf_counter()
            deadline = None if round_timeout is None else max(round_timeout, WARM_UP_PROGRESS_MIN)
            lost.update(self.warm_up(state_proto, clients_per_round, cold, deadline))
            timing.warm_up = time.perf_counter() - t0
        run_started = time.perf_counter()
        running = {i: ids for i, ids in sampled.items() if i not in lost}
        tokens = {
            i: self._pieces(i, [preprocessing.make_token(c, shuffle_seed) for c in ids])
            for i, ids in running.items()
            if ids
        }
        pause_points.reached(
            "dispatch", round_num, workers=[self.federation.workers[i].address for i in tokens]
        )
        outcome: MergeOutcome | None = None
        try:
            for i, pieces in tokens.items():
                self._make_room_for(i, pieces, self._train)
            if tokens:
                outcome = self._train.run(
                    self.federation,
                    self._pool,
                    state_proto,
                    tokens,
                    timing,
                    run_started,
                    phase_timeout=round_timeout,
                    accept=lambda delivered: sum(len(sampled[i]) for i in delivered) >= needed,
                    round_num=round_num,
                    track=self._track,
                )
                lost.update(outcome.lost)
        except NotEnough as e:
            lost.update(e.lost)
            got = sum(len(sampled[i]) for i in e.delivered)
            self._lose(lost)
            raise RoundIncomplete(
                f"{got} of {clients_per_round} sampled clients delivered, {needed} needed "
                f"({'; '.join(self._named(i, r) for i, r in lost.items())})",
                {self.federation.workers[i].address: r for i, r in lost.items()},
            ) from None
        except WorkerError as e:
            # A call outside the partial and merge phases (making room for a
            # client count) failed: that worker is lost before it started.
            index = next(i for i, w in enumerate(self.federation.workers) if w.label == e.worker)
            lost[index] = str(e)
            self._lose(lost)
            raise RoundIncomplete(str(e), {e.worker: str(e)}) from None
        self._lose(lost)
        if outcome is None:
            raise RoundIncomplete(
                "no worker could run the round",
                {self.federation.workers[i].address: r for i, r in lost.items()},
            )
        if self.federation.liveness is not None:
            for i in outcome.delivered:
                self.federation.liveness.delivered(i)
        result_proto = outcome.result
        output = cast(_ProcessOutput, self._train.after_merge.deserialize_result(result_proto))
        state_index = self._train.state_index
        self._known = (
            _KnownState(output.state, result_proto.struct.element[state_index].value)
            if state_index is not None
            else None
        )
        timing.total = time.perf_counter() - started
        wire_after = self._wire()
        by_peer = {label: wire_after[label].since(wire_before[label]) for label in wire_after}
        delivered = set(outcome.delivered)
        dropped = sorted(c for i, ids in sampled.items() if i not in delivered for c in ids)
        return RoundResult(
            state=output.state,
            metrics={
                **outputs.train_metrics(output.metrics, self.algorithm.user_defined),
                "clients": clients_per_round - len(dropped),
            },
            timing=timing,
            wire=WireStats.total(by_peer.values()),
            wire_by_peer=by_peer,
            sampled=clients_per_round,
            lost={f"worker{i}": reason for i, reason in sorted(lost.items())},
            lost_clients=dropped,
            finisher=f"worker{outcome.finisher}",
            refinished=outcome.refinished,
        )

    def evaluate(
        self,
        state: object,
        round_timeout: float | None = None,
        leave_out: frozenset[str] = frozenset(),
    ) -> dict | None:
        """Loss and accuracy of the global model on the held-out examples of every
        writer on a live worker (but those of the clients in `leave_out`); None
        if no worker could evaluate.

        A worker lost on the way is dropped like in a round; the figures then
        cover the writers of the workers that delivered (`examples` and
        `clients` say how many, `workers_lost` who was missing, and
        `workers_down` who was down already, so that a partial figure is never
        taken for the whole federation's).
        """
        if self._eval is None or self._eval_initialize is None or self._eval_set_weights is None:
            return None
        weights = self.model_weights(state)
        eval_state = self.server.worker.call(self._eval_initialize, None)
        eval_state = self.server.worker.call(self._eval_set_weights, (eval_state, weights))
        live = self.federation.live()
        tokens = {
            i: [
                preprocessing.make_token(c, 0)
                for c in self.federation.clients_of(i)
                if c not in leave_out
            ]
            for i in live
        }
        # A worker's writers in calls that fit its memory budget, merged on it.
        pieces = {i: self._pieces(i, t, evaluation=True) for i, t in tokens.items() if t}
        timing = RoundTiming()
        started = time.perf_counter()
        lost: dict[int, str] = {}
        outcome = None
        try:
            for i, worker_pieces in pieces.items():
                self._make_room_for(i, worker_pieces, self._eval)
            if pieces:
                outcome = self._eval.run(
                    self.federation,
                    self._pool,
                    self._eval.up_to_merge.serialize_element(0, eval_state),
                    pieces,
                    timing,
                    started,
                    phase_timeout=round_timeout,
                    track=self._track,
                )
                lost.update(outcome.lost)
        except NotEnough as e:
            lost.update(e.lost)
        self._lose(lost)
        if outcome is None:
            log.warning("no worker could evaluate the model: %s", "; ".join(lost.values()))
            return None
        output = cast(_ProcessOutput, self._eval.after_merge.deserialize_result(outcome.result))
        evaluation = {
            **outputs.eval_metrics(output.metrics),
            "clients": sum(len(tokens[i]) for i in outcome.delivered),
            "seconds": time.perf_counter() - started,
            "calls_per_worker": max(len(p) for p in pieces.values()),
        }
        if lost:
            evaluation["workers_lost"] = {f"worker{i}": r for i, r in sorted(lost.items())}
        down = [f"worker{i}" for i in range(len(self.federation.workers)) if i not in live]
        if down:
            evaluation["workers_down"] = down
        return evaluation
