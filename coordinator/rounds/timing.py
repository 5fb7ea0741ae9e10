"""Where a round's time went, and what a round returns."""

from __future__ import annotations

import dataclasses

from coordinator.executor_client import WireStats


@dataclasses.dataclass
class WorkerTiming:
    clients: int
    """Sampled clients, without the empty ones added as padding."""
    seconds: float
    """From dispatch until this worker's partial aggregate was done."""
    compute: float = 0.0
    """Starting the call until its partial was done: the worker's own work."""
    upload: float = 0.0
    """Sending the state and the client tokens."""
    setup: float = 0.0
    """Making an executor and loading the computation (first call per client count)."""
    new_executor: bool = False
    padded_to: int = 0
    """The client count the worker ran, empty clients included."""
    pieces: int = 1
    """Calls the worker's share ran as (more than one: it exceeded the worker's
    memory budget, and the worker merged the pieces itself)."""


@dataclasses.dataclass
class RoundTiming:
    total: float = 0.0
    prepare: float = 0.0
    """Tokens and serialized state, before anything is sent."""
    first_partial: float = 0.0
    """From the start until the first worker's partial aggregate was done."""
    workers_wall: float = 0.0
    """From the start until the last worker's partial aggregate was done."""
    merge: float = 0.0
    """Forwarding partials to the finisher and starting the merges there."""
    finalize: float = 0.0
    """From the last partial until the round's result was in: the merges still
    pending, `after_merge` and fetching its result."""
    per_worker: dict[str, WorkerTiming] = dataclasses.field(default_factory=dict)
    warm_up: float = 0.0
    """Building executors ahead, in the first round with a new number of clients."""

    @property
    def coordinator(self) -> float:
        """Time spent outside waiting on workers (merge, finalizer, bookkeeping)."""
        return max(0.0, self.total - self.warm_up - self.workers_wall)

    @property
    def worker_compute(self) -> float:
        """The slowest worker's compute time, which bounds the round."""
        return max((t.compute for t in self.per_worker.values()), default=0.0)

    @property
    def waiting(self) -> float:
        """Waiting on workers beyond their compute: transfers, set-up, imbalance."""
        return max(0.0, self.workers_wall - self.worker_compute)


@dataclasses.dataclass
class RoundResult:
    state: object
    metrics: dict
    timing: RoundTiming
    wire: WireStats
    wire_by_peer: dict[str, WireStats] = dataclasses.field(default_factory=dict)
    """Bytes per worker label, and for the coordinator's own server executor."""
    sampled: int = 0
    """Clients sampled; `metrics["clients"]` are those whose updates made it."""
    lost: dict[str, str] = dataclasses.field(default_factory=dict)
    """Workers dropped from the round (label -> why)."""
    lost_clients: list[str] = dataclasses.field(default_factory=list)
    delivered: dict[int, list[str]] = dataclasses.field(default_factory=dict)
    """The round's clients whose updates arrived, by worker index."""
    """Sampled clients whose updates did not make it (they were on lost workers)."""
    finisher: str = ""
    refinished: bool = False
    """The first finisher was lost and another worker finished the round."""
    live: list[int] = dataclasses.field(default_factory=list)
    """Workers the round's clients were sampled from (all that were up)."""
    workers_total: int = 0
    attempts: int = 1
    failed_attempts: list[str] = dataclasses.field(default_factory=list)
    """Why each earlier attempt of this round fell short."""

    def record(self) -> dict:
        """The round as plain data: what the run directory's metrics and the
        benchmark record (everything but the state)."""
        t = self.timing
        server = self.wire_by_peer.get("server")
        return {
            "clients": self.metrics["clients"],
            "examples": self.metrics["examples"],
            "train": {"loss": self.metrics["loss"], "accuracy": self.metrics["accuracy"]},
            "round_seconds": t.total,
            "timing": {
                "prepare": t.prepare,
                "first_partial": t.first_partial,
                "workers_wall": t.workers_wall,
                "merge": t.merge,
                "finalize": t.finalize,
                "coordinator": t.coordinator,
                "worker_compute": t.worker_compute,
                "waiting": t.waiting,
                "warm_up": t.warm_up,
            },
            "workers": {label: dataclasses.asdict(w) for label, w in sorted(t.per_worker.items())},
            "wire": {
                "bytes_sent": self.wire.bytes_sent,
                "bytes_received": self.wire.bytes_received,
                "server_bytes_sent": server.bytes_sent if server else 0,
                "server_bytes_received": server.bytes_received if server else 0,
            },
            "update_non_finite": self.metrics["update_non_finite"],
            "clients_sampled": self.sampled,
            "clients_lost": len(self.lost_clients),
            "lost_clients": self.lost_clients,
            "workers_lost": self.lost,
            "live_workers": self.live,
            "workers_total": self.workers_total,
            "degraded": int(bool(self.lost_clients or self.lost or self.failed_attempts)),
            "attempts": self.attempts,
            "failed_attempts": self.failed_attempts,
            "finisher": self.finisher,
            "refinished": int(self.refinished),
            "dropped_clients": self.metrics.get("dropped_clients", 0),
            "dropped_examples": self.metrics.get("dropped_examples", 0),
            **({"aggregator": a} if (a := self.metrics.get("aggregator")) else {}),
            # What a user's process measured (its own blocks' metrics, flattened).
            **({"measurements": m} if (m := self.metrics.get("measurements")) else {}),
        }
