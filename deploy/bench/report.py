"""Turning measured rounds into the benchmark's rows, ratios, targets and table.

Every figure of a row is a median over the measured rounds (the warm-up
round is reported but never enters a median). Ratios compare medians of
systems that ran the same workload: the same model, the same sampled clients
and the same data in every round.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

from deploy.bench.plan import WARMUP_ROUND

KERAS = "keras"
TFF = "tff_local"
FEDCOMPOSE = "fedcompose"
FEDCOMPOSE_TLS = "fedcompose_tls"
"""fedcompose with every worker behind its mutual-TLS proxy (`client_worker.proxy`)."""
FEDCOMPOSE_STRATIFIED = "fedcompose_stratified"
"""fedcompose with `--sampling stratified`: each worker's share proportional to its clients."""
FEDCOMPOSE_UNFUSED = "fedcompose_unfused"
"""fedcompose with a worker's share of a round as TensorFlow calls per client
(the path before `coordinator/algorithm/fused_share.py`)."""
CLIENT_LOOP = "client_loop"
"""Each client's own tf.data dataset and update in one tf.function, no executor
(client_loop.py): the floor of any path that keeps TFF's client-dataset contract."""
FEDCOMPOSE_SYSTEMS = (FEDCOMPOSE, FEDCOMPOSE_TLS, FEDCOMPOSE_STRATIFIED, FEDCOMPOSE_UNFUSED)
SYSTEM_NAMES = {
    KERAS: "Keras floor",
    CLIENT_LOOP: "client loop",
    TFF: "TFF 1 process",
    FEDCOMPOSE: "fedcompose",
    FEDCOMPOSE_TLS: "fedcompose+TLS",
    FEDCOMPOSE_STRATIFIED: "fedcompose stratified",
    FEDCOMPOSE_UNFUSED: "fedcomp unfused",
}
FUSED_FLOOR_TARGET = 2.0
"""The linear model at 1,000 clients per round on one worker: at most this
many times the Keras floor (issue 22)."""
TLS_TARGET = 0.10
"""TLS may add at most this share to a CNN round at 100 clients per round."""

OVERHEAD_TARGET_S = 0.100
SCALING_TARGET = 1.8
"""Pinned mode: W = 2 over W = 1, i.e. 90% scaling efficiency."""
STRATIFIED_SCALING_TARGET = 1.9
"""Pinned mode with stratified sampling: even shares remove the wait on a share
larger by chance (issue 22)."""
PINNED_TFF_MARGIN = 0.05
"""Pinned mode: fedcompose W = 1 against TFF's local context, both on one core."""


@dataclasses.dataclass
class Row:
    model: str
    clients_per_round: int
    system: str
    workers: int | None = None
    rounds: list[dict] = dataclasses.field(default_factory=list)
    memory: dict[str, int] = dataclasses.field(default_factory=dict)
    """Peak resident bytes per role during this workload (sampled)."""
    memory_hwm: dict[str, int] = dataclasses.field(default_factory=dict)
    """Kernel high-water marks of the same processes at the end of this workload."""
    model_bytes: int | None = None
    error: str | None = None
    load_average_at_start: float | None = None
    load_average_at_end: float | None = None
    """The machine's 1-minute load average (the highest over passes): above the
    core count, other processes were competing with the measurement."""

    @property
    def key(self) -> tuple:
        return (self.model, self.clients_per_round, self.system, self.workers)

    def measured(self) -> list[dict]:
        return [r for r in self.rounds if r.get("round") != WARMUP_ROUND]


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def round_gaps(rounds: Sequence[dict]) -> list[float]:
    """Seconds between consecutive round ends (`ended_at`: when the system
    could start its next round, records written or handed over), for each
    measured round: what a user waits per round, beside the round's own time.
    Ordered by time, not by round number: with --passes the same round numbers
    come once per pass, and only a pass's own next round follows a round end
    (`ended_at` is `time.perf_counter`, one monotonic clock for all processes)."""
    ends = sorted(
        ((r["round"], r["ended_at"]) for r in rounds if r.get("ended_at") is not None),
        key=lambda pair: pair[1],
    )
    return [
        b - a
        for (before, a), (after, b) in itertools.pairwise(ends)
        if after == before + 1 and after != WARMUP_ROUND
    ]


GAP_TARGETS = {("linear", 10): 1.2, ("cnn", 10): 1.1}
"""Median gap between round ends over median round time (issue 25)."""


def _role_max(memory: dict[str, int], prefix: str, executor: bool) -> int | None:
    values = [
        v
        for role, v in memory.items()
        if role.startswith(prefix) and role.endswith("_executor") == executor
    ]
    return max(values) if values else None


def summarize(row: Row) -> dict:
    rounds = row.measured()
    summary: dict = {
        "measured_rounds": len(rounds),
        "seconds_per_round": _median(r["seconds"] for r in rounds),
        "examples_per_round": _median(r["examples"] for r in rounds),
        "examples_per_second": _median(
            r["examples"] / r["seconds"] for r in rounds if r["seconds"] > 0
        ),
    }
    warmup = [r for r in row.rounds if r.get("round") == WARMUP_ROUND]
    summary["warmup_seconds"] = warmup[0]["seconds"] if warmup else None
    summary["gap_seconds"] = _median(round_gaps(row.rounds))
    if summary["gap_seconds"] is not None and summary["seconds_per_round"]:
        summary["gap_per_round"] = summary["gap_seconds"] / summary["seconds_per_round"]
    if row.system in FEDCOMPOSE_SYSTEMS:
        for name in (
            "worker_compute",
            "coordinator",
            "waiting",
            "overhead",
            "sample",
            "prepare",
            "first_partial",
            "merge",
            "finalize",
            "bytes_sent",
            "bytes_received",
            "server_bytes_sent",
            "server_bytes_received",
        ):
            summary[name] = _median(r.get(name) for r in rounds)
        summary["rounds_with_new_executors"] = sum(1 for r in rounds if r.get("new_executors"))
        summary["rounds_without_new_executors_seconds"] = _median(
            r["seconds"] for r in rounds if not r.get("new_executors")
        )
        sent, received = summary["bytes_sent"], summary["bytes_received"]
        server_sent = summary["server_bytes_sent"] or 0
        server_received = summary["server_bytes_received"] or 0
        if sent is not None and received is not None:
            summary["worker_bytes_sent"] = sent - server_sent
            summary["worker_bytes_received"] = received - server_received
        summary["model_bytes"] = row.model_bytes
        if row.model_bytes and sent is not None and received is not None:
            summary["wire_bytes_per_model_size"] = (sent + received) / row.model_bytes
            summary["wire_bytes_per_client"] = (sent + received) / row.clients_per_round
        summary["coordinator_rss"] = row.memory.get("coordinator")
        summary["server_executor_rss"] = row.memory.get("server_executor")
        summary["worker_rss_max"] = _role_max(row.memory, "worker", executor=False)
        summary["worker_executor_rss_max"] = _role_max(row.memory, "worker", executor=True)
        summary["coordinator_hwm"] = row.memory_hwm.get("coordinator")
        summary["server_executor_hwm"] = row.memory_hwm.get("server_executor")
        summary["worker_executor_hwm_max"] = _role_max(row.memory_hwm, "worker", executor=True)
    else:
        # The floors' second timings of the same examples (keras_floor.py, client_loop.py).
        for name in (
            "client_batches_seconds",
            "loop_seconds",
            "batches",
            "client_batches",
            "no_shuffle_seconds",
            "input_seconds",
        ):
            if any(name in r for r in rounds):
                summary[name] = _median(r.get(name) for r in rounds)
        summary["process_rss"] = row.memory.get("process")
        summary["executor_rss"] = row.memory.get("process_executor")
    return summary


def _find(
    rows: Sequence[Row], model: str, clients: int, system: str, workers: int | None = None
) -> Row | None:
    for row in rows:
        if (row.model, row.clients_per_round, row.system) == (model, clients, system) and (
            workers is None or row.workers == workers
        ):
            return row
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def add_ratios(rows: Sequence[Row], summaries: dict[tuple, dict]) -> None:
    """Time ratios against the baselines of the same workload (below 1: faster)."""
    for row in rows:
        summary = summaries[row.key]
        floor = _find(rows, row.model, row.clients_per_round, KERAS)
        tff = _find(rows, row.model, row.clients_per_round, TFF)
        seconds = summary["seconds_per_round"]
        summary["ratio_vs_tff"] = (
            _ratio(seconds, summaries[tff.key]["seconds_per_round"]) if tff else None
        )
        summary["ratio_vs_floor"] = (
            _ratio(seconds, summaries[floor.key]["seconds_per_round"]) if floor else None
        )
        floor_seconds = summaries[floor.key]["seconds_per_round"] if floor else None
        # What a round costs beyond the floor's compute, per client: the fixed
        # cost of running a client (calls, sessions, variables), not its examples.
        summary["per_client_ms"] = (
            (seconds - floor_seconds) / row.clients_per_round * 1e3
            if row.system != KERAS and seconds is not None and floor_seconds is not None
            else None
        )
        if row.system == FEDCOMPOSE_TLS:
            plain = _find(rows, row.model, row.clients_per_round, FEDCOMPOSE, row.workers)
            ratio = (
                _ratio(seconds, summaries[plain.key]["seconds_per_round"])
                if plain and not plain.error
                else None
            )
            summary["tls_added"] = ratio - 1.0 if ratio is not None else None
            summary["tls_added_seconds"] = (
                seconds - summaries[plain.key]["seconds_per_round"]
                if ratio is not None and seconds is not None
                else None
            )


def pinned_targets(rows: Sequence[Row], summaries: dict[tuple, dict]) -> list[dict]:
    """Pinned mode's targets: each added worker's core adds its share, and one
    worker on one core is as fast as TFF's own runtime on one core."""
    found: list[dict] = []
    seconds = {
        (r.system, r.model, r.clients_per_round, r.workers): summaries[r.key]["seconds_per_round"]
        for r in rows
        if r.system in (FEDCOMPOSE, FEDCOMPOSE_STRATIFIED) and not r.error
    }
    for (system, model, clients, workers), two in sorted(seconds.items()):
        # With one worker both samplings draw the same clients, so either W=1 row serves.
        one = seconds.get((system, model, clients, 1)) or seconds.get(
            (FEDCOMPOSE, model, clients, 1)
        )
        if workers == 2 and one and two:
            target = (
                STRATIFIED_SCALING_TARGET if system == FEDCOMPOSE_STRATIFIED else SCALING_TARGET
            )
            found.append(
                {
                    "target": f"pinned: W=2 at least {target:g}x as fast as W=1"
                    + (" (stratified sampling)" if system == FEDCOMPOSE_STRATIFIED else ""),
                    "model": model,
                    "clients": clients,
                    "speedup": one / two,
                    "seconds": [one, two],
                    "met": one / two >= target,
                }
            )
    for r in rows:
        s = summaries[r.key]
        if r.system == FEDCOMPOSE and r.workers == 1 and s.get("ratio_vs_tff") is not None:
            found.append(
                {
                    "target": "pinned: W=1 within 5% of TFF on one core",
                    "model": r.model,
                    "clients": r.clients_per_round,
                    "ratio_vs_tff": s["ratio_vs_tff"],
                    "met": s["ratio_vs_tff"] <= 1.0 + PINNED_TFF_MARGIN,
                }
            )
    return found


def targets(rows: Sequence[Row], summaries: dict[tuple, dict], pinned: bool = False) -> list[dict]:
    """The issue's targets, each with the figures that decide it."""
    found: list[dict] = pinned_targets(rows, summaries) if pinned else []
    fed = [r for r in rows if r.system == FEDCOMPOSE and not r.error]
    models = sorted({r.model for r in fed})
    for model in models:
        mine = [r for r in fed if r.model == model]
        # Wire bytes: for a fixed W, how much do they grow from the fewest to
        # the most clients per round? For a fixed client count, across W?
        for workers in sorted({r.workers for r in mine}):
            series = sorted(
                (
                    r.clients_per_round,
                    summaries[r.key]["bytes_sent"],
                    summaries[r.key]["bytes_received"],
                )
                for r in mine
                if r.workers == workers
            )
            if len(series) > 1 and series[0][1] and series[0][2]:
                low, high = series[0], series[-1]
                growth = (high[1] + high[2]) / (low[1] + low[2])
                found.append(
                    {
                        "target": "wire bytes do not grow with clients",
                        "model": model,
                        "workers": workers,
                        "clients": [low[0], high[0]],
                        "bytes_per_round": [low[1] + low[2], high[1] + high[2]],
                        "growth": growth,
                        "met": growth < 1.5,
                    }
                )
            rss = [
                (r.clients_per_round, summaries[r.key]["coordinator_rss"])
                for r in sorted(mine, key=lambda r: r.clients_per_round)
                if r.workers == workers and summaries[r.key]["coordinator_rss"]
            ]
            if len(rss) > 1:
                growth = rss[-1][1] / rss[0][1]
                found.append(
                    {
                        "target": "coordinator memory does not grow with clients",
                        "model": model,
                        "workers": workers,
                        "clients": [rss[0][0], rss[-1][0]],
                        "rss": [rss[0][1], rss[-1][1]],
                        "growth": growth,
                        "met": growth < 1.1,
                    }
                )
        for r in mine:
            s = summaries[r.key]
            # Pinned, TFF runs on one core and W workers on W: not a fair race.
            if r.clients_per_round == 100 and s.get("ratio_vs_tff") is not None and not pinned:
                found.append(
                    {
                        "target": "faster than TFF in one process at 100 clients/round",
                        "model": model,
                        "workers": r.workers,
                        "ratio_vs_tff": s["ratio_vs_tff"],
                        "met": s["ratio_vs_tff"] < 1.0,
                    }
                )
            if s.get("overhead") is not None:
                found.append(
                    {
                        "target": "overhead beyond worker compute under 100 ms",
                        "model": model,
                        "workers": r.workers,
                        "clients": r.clients_per_round,
                        "overhead_s": s["overhead"],
                        "coordinator_s": s["coordinator"],
                        "waiting_s": s["waiting"],
                        "met": s["overhead"] < OVERHEAD_TARGET_S,
                    }
                )
    found += fused_targets(rows, summaries)
    for r in rows:
        s = summaries[r.key]
        limit = GAP_TARGETS.get((r.model, r.clients_per_round))
        if r.system == FEDCOMPOSE and not r.error and limit and s.get("gap_per_round"):
            found.append(
                {
                    "target": f"gap between round ends at most {limit}x the round time",
                    "model": r.model,
                    "workers": r.workers,
                    "clients": r.clients_per_round,
                    "gap_s": s["gap_seconds"],
                    "round_s": s["seconds_per_round"],
                    "gap_per_round": s["gap_per_round"],
                    "met": s["gap_per_round"] <= limit,
                }
            )
        if r.system == FEDCOMPOSE_TLS and not r.error and s.get("tls_added") is not None:
            found.append(
                {
                    "target": "TLS adds under 10% to a CNN round at 100 clients/round"
                    if (r.model, r.clients_per_round) == ("cnn", 100)
                    else "TLS cost (no target for this workload)",
                    "model": r.model,
                    "workers": r.workers,
                    "clients": r.clients_per_round,
                    "tls_added": s["tls_added"],
                    "tls_added_seconds": s["tls_added_seconds"],
                    "met": s["tls_added"] < TLS_TARGET,
                }
            )
    return found


def _bounds(
    rows: Sequence[Row], summaries: dict[tuple, dict], model: str, clients: int
) -> dict[str, float | None]:
    """What the clients' own work costs with no executor, for the fused path's
    figures to be read against (reference costs, not lower bounds: the fused
    call runs its parts concurrently, and can beat them). As multiples of the
    Keras floor: every client's own tf.data dataset and update in one
    tf.function, with and without the shuffle (the client loop), and those
    datasets read and iterated alone; and Keras' own compiled loop over the
    examples batched client by client, against the same loop over the union's
    batches (only the batching differs)."""
    floor = _find(rows, model, clients, KERAS)
    loop = _find(rows, model, clients, CLIENT_LOOP)
    if floor is None or floor.error:
        return {}
    f = summaries[floor.key]
    # Against the same compiled loop over the union's batches, not the floor
    # (the faster of that loop and `fit`): only the batching differs.
    found = {"client_batches": _ratio(f.get("client_batches_seconds"), f.get("loop_seconds"))}
    if f.get("batches"):
        found["batch_count"] = _ratio(f.get("client_batches"), f["batches"])
    if loop is not None and not loop.error:
        c = summaries[loop.key]
        found["client_loop_no_shuffle"] = _ratio(
            c.get("no_shuffle_seconds"), f["seconds_per_round"]
        )
        found["client_loop"] = _ratio(c["seconds_per_round"], f["seconds_per_round"])
        found["client_input"] = _ratio(c.get("input_seconds"), f["seconds_per_round"])
    return found


def fused_targets(rows: Sequence[Row], summaries: dict[tuple, dict]) -> list[dict]:
    """Issue 22's targets, where the run measured both paths: the linear model at
    1,000 clients per round on one worker within 2x the Keras floor, the CNN at
    100 no slower fused than unfused; with the per-client cost before and after."""
    found = []
    for r in rows:
        unfused = _find(rows, r.model, r.clients_per_round, FEDCOMPOSE_UNFUSED, r.workers)
        if r.system != FEDCOMPOSE or r.error or unfused is None or unfused.error:
            continue
        s, u = summaries[r.key], summaries[unfused.key]
        figures = {
            "model": r.model,
            "workers": r.workers,
            "clients": r.clients_per_round,
            "seconds": [u["seconds_per_round"], s["seconds_per_round"]],
            "xfloor": [u.get("ratio_vs_floor"), s.get("ratio_vs_floor")],
            "per_client_ms": [u.get("per_client_ms"), s.get("per_client_ms")],
            "bounds": _bounds(rows, summaries, r.model, r.clients_per_round),
        }
        if (r.model, r.clients_per_round, r.workers) == ("linear", 1000, 1):
            ratio = s.get("ratio_vs_floor")
            found.append(
                {
                    "target": f"fused: linear at 1000 clients/round, W=1, at most "
                    f"{FUSED_FLOOR_TARGET:g}x the Keras floor",
                    **figures,
                    "met": ratio is not None and ratio <= FUSED_FLOOR_TARGET,
                }
            )
        elif (r.model, r.clients_per_round) == ("cnn", 100):
            found.append(
                {
                    "target": "fused: CNN at 100 clients/round no slower than unfused",
                    **figures,
                    "met": s["seconds_per_round"] <= u["seconds_per_round"],
                }
            )
        else:
            found.append(
                {
                    "target": "fused against unfused (no target here)",
                    **figures,
                    "met": s["seconds_per_round"] <= u["seconds_per_round"],
                }
            )
    return found


def _fmt(value: float | None, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value * scale:{spec}}{suffix}"


COLUMNS = (
    ("model", "<6"),
    ("clients", ">7"),
    ("system", "<14"),
    ("W", ">2"),
    ("s/round", ">8"),
    ("gap", ">7"),
    ("ex/s", ">7"),
    ("compute", ">8"),
    ("coord", ">7"),
    ("wait", ">7"),
    ("overhd", ">7"),
    ("sent KB", ">8"),
    ("recv KB", ">8"),
    ("coord MB", ">9"),
    ("wrk MB", ">7"),
    ("xTFF", ">6"),
    ("xfloor", ">7"),
    ("ms/cl", ">6"),
    ("load", ">5"),
)


def table(rows: Sequence[Row], summaries: dict[tuple, dict]) -> str:
    """The table the command prints: one line per system and workload."""
    header = "  ".join(f"{name:{align}}" for name, align in COLUMNS)
    lines = [header, "-" * len(header)]
    order = {
        KERAS: 0,
        CLIENT_LOOP: 0.5,
        TFF: 1,
        FEDCOMPOSE: 2,
        FEDCOMPOSE_UNFUSED: 3,
        FEDCOMPOSE_TLS: 4,
        FEDCOMPOSE_STRATIFIED: 5,
    }
    for row in sorted(
        rows, key=lambda r: (r.model, r.clients_per_round, order[r.system], r.workers or 0)
    ):
        s = summaries[row.key]
        if row.error:
            cells = [row.model, str(row.clients_per_round), SYSTEM_NAMES[row.system]]
            cells += [str(row.workers or ""), f"error: {row.error[:80]}"]
            lines.append("  ".join(cells))
            continue
        fed = row.system in FEDCOMPOSE_SYSTEMS
        coord_mb = s.get("coordinator_rss") if fed else s.get("process_rss")
        if coord_mb and fed and s.get("server_executor_rss"):
            coord_text = f"{coord_mb / 2**20:.0f}+{s['server_executor_rss'] / 2**20:.0f}"
        elif coord_mb and s.get("executor_rss"):
            coord_text = f"{coord_mb / 2**20:.0f}+{s['executor_rss'] / 2**20:.0f}"
        else:
            coord_text = _fmt(coord_mb, ".0f", 1 / 2**20)
        worker_text = "-"
        if fed and s.get("worker_rss_max") and s.get("worker_executor_rss_max"):
            worker_text = (
                f"{s['worker_rss_max'] / 2**20:.0f}+{s['worker_executor_rss_max'] / 2**20:.0f}"
            )
        values = [
            row.model,
            str(row.clients_per_round),
            SYSTEM_NAMES[row.system],
            str(row.workers) if row.workers else "",
            _fmt(s["seconds_per_round"], ".3f"),
            _fmt(s.get("gap_seconds"), ".3f"),
            _fmt(s["examples_per_second"], ".0f"),
            _fmt(s.get("worker_compute"), ".3f"),
            _fmt(s.get("coordinator"), ".3f"),
            _fmt(s.get("waiting"), ".3f"),
            _fmt(s.get("overhead"), ".3f"),
            _fmt(s.get("bytes_sent"), ".0f", 1e-3),
            _fmt(s.get("bytes_received"), ".0f", 1e-3),
            coord_text,
            worker_text,
            _fmt(s.get("ratio_vs_tff"), ".2f"),
            _fmt(s.get("ratio_vs_floor"), ".1f"),
            _fmt(s.get("per_client_ms"), ".2f"),
            _fmt(row.load_average_at_end, ".1f"),
        ]
        lines.append(
            "  ".join(f"{v:{align}}" for v, (_, align) in zip(values, COLUMNS, strict=True))
        )
    return "\n".join(lines)


def targets_text(found: Sequence[dict]) -> str:
    lines = []
    for t in found:
        verdict = "met" if t["met"] else "NOT met"
        if t["target"].startswith("wire"):
            detail = (
                f"{t['model']} W={t['workers']}: {t['bytes_per_round'][0] / 1e3:.0f} KB at "
                f"{t['clients'][0]} clients, {t['bytes_per_round'][1] / 1e3:.0f} KB at "
                f"{t['clients'][1]} (x{t['growth']:.2f})"
            )
        elif t["target"].startswith("coordinator memory"):
            detail = (
                f"{t['model']} W={t['workers']}: {t['rss'][0] / 2**20:.0f} MB at "
                f"{t['clients'][0]} clients, {t['rss'][1] / 2**20:.0f} MB at {t['clients'][1]}"
            )
        elif t["target"].startswith("TLS"):
            verdict = verdict if "no target" not in t["target"] else "info"
            detail = (
                f"{t['model']} W={t['workers']} {t['clients']} clients: "
                f"{t['tls_added'] * 100:+.1f}% ({t['tls_added_seconds'] * 1000:+.0f} ms) "
                "against fedcompose without TLS"
            )
        elif t["target"].startswith("pinned: W=2"):
            detail = (
                f"{t['model']} {t['clients']} clients: x{t['speedup']:.2f} "
                f"({t['seconds'][0]:.3f} s at W=1, {t['seconds'][1]:.3f} s at W=2)"
            )
        elif t["target"].startswith("pinned: W=1"):
            detail = f"{t['model']} {t['clients']} clients: x{t['ratio_vs_tff']:.3f} of TFF's time"
        elif t["target"].startswith("gap"):
            detail = (
                f"{t['model']} W={t['workers']} {t['clients']} clients: gap "
                f"{t['gap_s']:.3f} s, round {t['round_s']:.3f} s (x{t['gap_per_round']:.2f})"
            )
        elif t["target"].startswith("fused"):
            verdict = verdict if "no target" not in t["target"] else "info"
            detail = _fused_detail(t)
        elif t["target"].startswith("faster"):
            detail = f"{t['model']} W={t['workers']}: x{t['ratio_vs_tff']:.2f} of TFF's time"
        else:
            detail = (
                f"{t['model']} W={t['workers']} {t['clients']} clients: "
                f"{t['overhead_s'] * 1000:.0f} ms (coordinator {t['coordinator_s'] * 1000:.0f}, "
                f"waiting {t['waiting_s'] * 1000:.0f})"
            )
        lines.append(f"[{verdict:>7}] {t['target']}: {detail}")
    return "\n".join(lines)


def _fused_detail(t: dict) -> str:
    def pair(values: list, spec: str) -> str:
        return " -> ".join(_fmt(v, spec) for v in values)

    detail = (
        f"{t['model']} W={t['workers']} {t['clients']} clients, unfused -> fused: "
        f"{pair(t['seconds'], '.3f')} s/round, x{pair(t['xfloor'], '.2f')} the floor, "
        f"{pair(t['per_client_ms'], '.3f')} ms per client beyond it"
    )
    bounds = t.get("bounds") or {}
    named = [
        ("client_input", "clients' datasets read alone"),
        ("client_loop_no_shuffle", "client loop without shuffle"),
        ("client_loop", "client loop"),
    ]
    shown = [f"{label} x{bounds[k]:.2f}" for k, label in named if bounds.get(k) is not None]
    batching = bounds.get("client_batches")
    if batching is not None:
        shown.append(f"Keras batched client by client x{batching:.2f} its union loop")
    if shown:
        detail += "; without an executor: " + ", ".join(shown)
    return detail


def assemble(rows: Sequence[Row], meta: dict, elapsed_seconds: float) -> dict:
    """Everything the benchmark writes as JSON."""
    summaries = {row.key: summarize(row) for row in rows}
    add_ratios(rows, summaries)
    found = targets(rows, summaries, pinned=bool(meta.get("pinning")))
    return {
        "meta": {**meta, "elapsed_seconds": elapsed_seconds},
        "rows": [
            {
                "model": row.model,
                "clients_per_round": row.clients_per_round,
                "system": row.system,
                "workers": row.workers,
                "error": row.error,
                "load_average": [row.load_average_at_start, row.load_average_at_end],
                "summary": summaries[row.key],
                "memory_peak_bytes": row.memory,
                "memory_hwm_bytes": row.memory_hwm,
                "rounds": row.rounds,
            }
            for row in rows
        ],
        "targets": found,
        "table": table(rows, summaries),
    }


def render(results: dict) -> str:
    m = results["meta"]["machine"]
    head = (
        f"fedcompose bench, {results['meta']['date']}: {m['cores']} cores, "
        f"{m['memory_gib']:g} GiB, {m['cpu']}, Python {m['python']}, TFF {m['tff']}, "
        f"TF {m['tensorflow']}"
    )
    legend = (
        "medians over the measured rounds after one warm-up round; s/round and ex/s: whole "
        "rounds; gap = time between consecutive round ends, records included (fedcompose "
        "writes metrics, TensorBoard and a checkpoint every round, as `train` does); "
        "compute = the slowest worker's computing (from starting its call to its "
        "partial being done); wait = the rest of the wait for workers (serializing and "
        "sending the state, set-up); coord = the rest of the round (sampling, merges and "
        "finalizer still pending after the last partial, fetching and decoding the new "
        "state); overhd = round minus compute; KB = bytes the coordinator sent and received "
        "per round; MB = peak RSS, process+executor child (coordinator+its server executor, "
        "largest worker+its executor); "
        "xTFF / xfloor = round time over TFF's / Keras' for the same examples; "
        "fedcompose+TLS = every worker behind its mutual-TLS proxy, as on other machines; "
        "load = the "
        "machine's 1-minute load average at the workload's end, highest over passes (above "
        "the core count, other processes competed with the measurement)"
    )
    pinning = results["meta"].get("pinning")
    if pinning:
        legend += (
            "; PINNED: worker i and its worker_binary on core i "
            f"({pinning['workers']}), TFF in one process and Keras on core "
            f"{pinning['tff_local'][0]}, TensorFlow's thread pools sized to the cores "
            "given, the coordinator unpinned"
        )
    parts = [head, legend, "", results["table"]]
    if results["targets"]:
        parts += ["", targets_text(results["targets"])]
    return "\n".join(parts)


def plot_seconds_per_round(results: dict, path: Path) -> None:
    """Seconds per round against clients per round, for every system, log-log."""
    from coordinator import plots

    series: dict[str, list[tuple[float, float]]] = {}
    for row in results["rows"]:
        seconds = row["summary"].get("seconds_per_round")
        if row["error"] or seconds is None:
            continue
        name = SYSTEM_NAMES.get(row["system"], row["system"])
        if row["workers"]:
            name += f" W={row['workers']}"
        series.setdefault(f"{row['model']}: {name}", []).append((row["clients_per_round"], seconds))
    plots.plot_loglog(series, path, "clients per round", "seconds per round", "round time")
