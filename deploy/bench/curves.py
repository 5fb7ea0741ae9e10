"""Cost curves of the benchmark: what grows with clients per round and hosted clients.

* memory: a worker's peak memory against clients per round, with the worker
  memory budget (a worker's share runs in calls that fit it) and without (one
  call per worker), on the same clients;
* scale: worker start-up (the full shard check included), coordinator
  discovery, rounds, evaluation of every writer and a checkpoint, and the
  coordinator's memory, against hosted clients, up to 100,000.

Each point runs in fresh processes (a process's memory never shrinks back),
measured by the same sampler as the grid. Results go to `curves.json` and a
PNG per curve in the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("fedcompose.bench")

MB = 2**20


def _worker_peak(memory: dict[str, int]) -> int:
    """The largest worker's peak (process + executor service), bytes."""
    totals: dict[str, int] = {}
    for role, value in memory.items():
        if role.startswith("worker"):
            name = role.removesuffix("_executor")
            totals[name] = totals.get(name, 0) + value
    return max(totals.values(), default=0)


def memory_curve(
    config, plan, shard_sets, run_dir: Path, sampler, bar, points: list[dict]
) -> list[dict]:
    """Peak worker memory against clients per round, with and without the budget;
    each point is appended to `points` as soon as it is measured."""
    from deploy.bench.report import summarize
    from deploy.bench.runner import Runner

    workers = config.federation.workers[0]
    budget = config.federation.worker_memory_mb
    for memory_mb in dict.fromkeys([budget, 0]):
        for model in plan.models:
            for clients in plan.clients_for(model):
                point_plan = dataclasses.replace(
                    plan,
                    models=(model,),
                    clients_per_round=(clients,),
                    worker_memory_mb=memory_mb,
                )
                work = run_dir / f"memory-{model}-{clients}-{memory_mb or 'unbounded'}"
                work.mkdir(parents=True, exist_ok=True)
                runner = Runner(point_plan, work, bar, sampler)
                runner.fedcompose(workers, shard_sets[workers])
                row = runner.rows[(model, clients, "fedcompose", workers)]
                summary = summarize(row)
                pieces = max(
                    (w.get("pieces", 1) for r in row.measured() for w in r["per_worker"].values()),
                    default=None,
                )
                points.append(
                    {
                        "model": model,
                        "clients_per_round": clients,
                        "workers": workers,
                        "worker_memory_mb": memory_mb,
                        "worker_peak_mb": _worker_peak(row.memory) / MB,
                        "seconds_per_round": summary["seconds_per_round"],
                        "pieces": pieces,
                        "error": row.error,
                    }
                )
                log.info("memory curve: %s", points[-1])
    for memory_mb in dict.fromkeys([budget, 0]):
        for model in plan.models:
            points.append(
                _evaluation_point(config, model, memory_mb, shard_sets[workers], run_dir, sampler)
            )
            bar.update(1)
    return points


def _evaluation_point(
    config, model: str, memory_mb: int, shard_dirs: list[Path], run_dir: Path, sampler
) -> dict:
    """The largest worker's peak while evaluating every hosted writer, with and
    without the budget (without: each worker evaluates all its writers in one
    call)."""
    from deploy import workers as workers_lib

    work = run_dir / f"memory-{model}-evaluation-{memory_mb or 'unbounded'}"
    work.mkdir(parents=True, exist_ok=True)
    started = workers_lib.start_workers(shard_dirs, work / "logs", check="quick")
    try:
        for w in started:
            sampler.watch(f"worker{w.index}", w.process.pid, f"worker{w.index}_executor")
        events, peaks = _run_scale_child(
            {
                "hosted": config.bench.hosted_clients,
                "addresses": [w.address for w in started],
                "log_dir": str(work / "logs"),
                "rpc_timeout": config.federation.rpc_timeout,
                "model": model,
                "worker_memory_mb": memory_mb,
                "clients_per_round": [],
            },
            work,
            sampler,
        )
    finally:
        sampler.unwatch_all()
        workers_lib.stop_workers(started)
    evaluation = next(e for e in events if e.get("step") == "evaluation")
    point = {
        "model": model,
        "clients_per_round": evaluation["clients"],
        "workers": len(shard_dirs),
        "worker_memory_mb": memory_mb,
        "worker_peak_mb": _worker_peak(peaks) / MB,
        "seconds_per_round": evaluation["seconds"],
        "pieces": evaluation.get("pieces"),
        "error": None,
        "evaluation": True,
    }
    log.info("memory curve: %s", point)
    return point


def _start_timed(shard_dirs: list[Path], logs: Path):
    """Starts workers with the full shard check; returns them and the seconds
    until every one served."""
    from deploy import workers as workers_lib

    t0 = time.perf_counter()
    started = workers_lib.start_workers(shard_dirs, logs, check="full", ready_timeout=1800.0)
    return started, time.perf_counter() - t0


def _run_scale_child(config: dict, work: Path, sampler) -> tuple[list[dict], dict[str, int]]:
    """Runs the scale child to its end; its events, and the peak memory of every
    watched process while it ran (a phase of its own: points never mix)."""
    from deploy.bench import protocol as bench_protocol
    from deploy.bench.runner import ROOT
    from shared import processes

    path = work / "scale-child.json"
    path.write_text(json.dumps(config))
    events = []
    with open(work / "scale-child.log", "ab") as log_file:
        proc = processes.spawn(
            [sys.executable, "-m", "deploy.bench.scale_child", str(path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log_file,
            death_signal=signal.SIGTERM,
        )
    try:
        sampler.watch("coordinator", proc.pid, "server_executor")
        sampler.set_phase(f"child:{work}")
        assert proc.stdout is not None
        for raw in proc.stdout:
            event = bench_protocol.parse(raw.decode(errors="replace"))
            if event is not None:
                events.append(event)
        code = proc.wait()
    finally:
        sampler.set_phase(None)
        processes.stop(proc, grace=10.0)
    if code != 0:
        raise RuntimeError(f"scale child exited with code {code} (log: {work / 'scale-child.log'})")
    return events, sampler.peaks(f"child:{work}")


def scale_curve(config, run_dir: Path, sampler, bar, points: list[dict]) -> list[dict]:
    """Start-up, discovery, rounds, evaluation, checkpoint and coordinator memory
    against hosted clients, on two workers; each point is appended to `points`
    as soon as it is measured."""
    from deploy import workers as workers_lib
    from deploy.data import synthetic

    for hosted in config.bench.scale_hosted:
        # Few examples per writer: the figures are about clients, and the
        # shards of 100,000 writers stay under 2 GB.
        spec = synthetic.SyntheticSpec(
            writers=hosted, mean_train_examples=4, test_examples=1, seed=config.data.data_seed
        )
        t0 = time.perf_counter()
        shard_dirs = synthetic.build_shard_sets(spec, Path(config.bench.data_cache), [2])[2]
        build_seconds = time.perf_counter() - t0
        work = run_dir / f"scale-{hosted}"
        work.mkdir(parents=True, exist_ok=True)
        bar.set_description(f"scale {hosted} hosted clients")
        started, startup = _start_timed(shard_dirs, work / "logs")
        try:
            sampler.watch("worker0", started[0].process.pid, "worker0_executor")
            events, peaks = _run_scale_child(
                {
                    "hosted": hosted,
                    "addresses": [w.address for w in started],
                    "log_dir": str(work / "logs"),
                    "rpc_timeout": config.federation.rpc_timeout,
                    "model": "linear",
                    "worker_memory_mb": config.federation.worker_memory_mb,
                    "clients_per_round": [c for c in (10, 1000) if c <= hosted],
                },
                work,
                sampler,
            )
        finally:
            sampler.unwatch_all()
            workers_lib.stop_workers(started)
        steps = {(e["step"], e.get("round")): e for e in events if e.get("event") == "step"}
        point = {
            "hosted_clients": hosted,
            "shards_build_seconds": build_seconds,
            "worker_startup_seconds": startup,
            "discovery_seconds": steps[("discovery", None)]["seconds"],
            "coordinator_mb": peaks.get("coordinator", 0) / MB,
            "server_executor_mb": peaks.get("server_executor", 0) / MB,
            "coordinator_after_discovery_mb": steps[("discovery", None)]["rss_mb"],
            "evaluation_seconds": steps[("evaluation", None)]["seconds"],
            "evaluated_clients": steps[("evaluation", None)]["clients"],
            "checkpoint_seconds": steps[("checkpoint", None)]["seconds"],
        }
        for (step, round_num), event in steps.items():
            if step.startswith("round/") and round_num == 2:
                point[f"{step.replace('/', '_')}_seconds"] = event["seconds"]
                point[f"{step.replace('/', '_')}_sample_seconds"] = event["sample_seconds"]
        points.append(point)
        log.info("scale curve: %s", point)
        bar.update(1)
    return points


def memory_targets(points: list[dict]) -> list[dict]:
    """Worker peak memory at 1,000 CNN clients per round within 1.5x of its
    figure at 100, with the budget."""
    found = []
    by = {
        (p["model"], p["clients_per_round"], p["worker_memory_mb"]): p
        for p in points
        if not p["error"] and not p.get("evaluation")
    }
    for (model, clients, budget), p in by.items():
        if clients != 1000 or not budget:
            continue
        base = by.get((model, 100, budget))
        if base:
            ratio = p["worker_peak_mb"] / base["worker_peak_mb"]
            found.append(
                {
                    "target": "worker peak memory at 1,000 clients/round within 1.5x of 100",
                    "model": model,
                    "ratio": ratio,
                    "met": ratio <= 1.5,
                }
            )
    return found


def scale_targets(points: list[dict]) -> list[dict]:
    found = []
    by = {p["hosted_clients"]: p for p in points}
    small, large = by.get(3400), by.get(100_000)
    if small and large:
        total_small = small["coordinator_mb"] + small["server_executor_mb"]
        total_large = large["coordinator_mb"] + large["server_executor_mb"]
        ratio = total_large / total_small
        found.append(
            {
                "target": "coordinator memory at 100,000 hosted clients within 1.2x of 3,400",
                "ratio": ratio,
                "met": ratio <= 1.2,
            }
        )
    if large:
        found.append(
            {
                "target": "start-up of 100,000 hosted clients under a minute",
                "seconds": large["worker_startup_seconds"],
                "met": large["worker_startup_seconds"] < 60,
            }
        )
    return found


def plot_memory(points: list[dict], path: Path) -> None:
    from coordinator import plots

    series: dict[str, list[tuple[float, float]]] = {}
    for p in points:
        if p["error"] or p.get("evaluation"):
            continue
        budget = f"budget {p['worker_memory_mb']} MB" if p["worker_memory_mb"] else "no budget"
        label = f"{p['model']}, W={p['workers']}, {budget}"
        series.setdefault(label, []).append((p["clients_per_round"], p["worker_peak_mb"]))
    plots.plot_loglog(
        series, path, "clients per round", "largest worker's peak memory (MB)", "worker memory"
    )


def plot_scale(points: list[dict], path: Path) -> None:
    from coordinator import plots

    series = {
        name: [(p["hosted_clients"], p[key]) for p in points]
        for name, key in (
            ("worker start-up, full shard check (s)", "worker_startup_seconds"),
            ("discovery (s)", "discovery_seconds"),
            ("evaluation of every writer (s)", "evaluation_seconds"),
            ("coordinator RSS (MB / 100)", "coordinator_mb"),
        )
    }
    series["coordinator RSS (MB / 100)"] = [
        (x, y / 100) for x, y in series["coordinator RSS (MB / 100)"]
    ]
    plots.plot_loglog(series, path, "hosted clients", "seconds (MB / 100)", "scale")


def memory_table(points: list[dict]) -> str:
    lines = [
        "worker memory against clients per round",
        f"{'model':<8}{'W':>3}{'clients':>9}{'budget MB':>11}{'calls':>7}{'peak MB':>10}"
        f"{'s/round':>10}",
    ]
    for p in points:
        if p.get("evaluation"):
            lines.append(
                f"{p['model']:<8}{p['workers']:>3}{p['clients_per_round']:>9}"
                f"{p['worker_memory_mb'] or 'none':>11}{p['pieces'] or '-':>7}"
                f"{p['worker_peak_mb']:>10.0f}"
                f"{p['seconds_per_round']:>10.2f}  (evaluation of every hosted writer)"
            )
            continue
        lines.append(
            f"{p['model']:<8}{p['workers']:>3}{p['clients_per_round']:>9}"
            f"{p['worker_memory_mb'] or 'none':>11}{p['pieces'] or '-':>7}"
            f"{p['worker_peak_mb']:>10.0f}"
            + (f"{p['seconds_per_round']:>10.2f}" if p["seconds_per_round"] else f"{'-':>10}")
            + (f"  error: {p['error']}" if p["error"] else "")
        )
    return "\n".join(lines)


def scale_table(points: list[dict]) -> str:
    lines = [
        "against hosted clients (2 workers, linear model)",
        f"{'hosted':>8}{'start-up s':>12}{'discovery s':>13}{'round@10 s':>12}"
        f"{'round@1000 s':>14}{'eval s':>9}{'ckpt s':>8}{'coord MB':>10}",
    ]
    for p in points:
        lines.append(
            f"{p['hosted_clients']:>8}{p['worker_startup_seconds']:>12.1f}"
            f"{p['discovery_seconds']:>13.2f}{p.get('round_10_seconds', 0):>12.2f}"
            f"{p.get('round_1000_seconds', 0):>14.2f}{p['evaluation_seconds']:>9.1f}"
            f"{p['checkpoint_seconds']:>8.2f}"
            f"{p['coordinator_mb']:>6.0f}+{p['server_executor_mb']:<3.0f}"
        )
    return "\n".join(lines)


def targets_lines(section: dict) -> list[str]:
    lines = []
    for t in section["targets"]:
        verdict = "met" if t["met"] else "NOT met"
        detail = f"x{t['ratio']:.2f}" if "ratio" in t else f"{t['seconds']:.1f}s"
        model = f" ({t['model']})" if "model" in t else ""
        lines.append(f"[{verdict:>7}] {t['target']}{model}: {detail}")
    return lines
