"""`fedcompose bench`: where a round's time goes, against the baselines.

In one run, on the same clients, data, model, batch size and local epochs:

1. compute floor: plain Keras over the union of each round's clients;
2. TFF in one process: the same composed process in TFF's local context;
3. fedcompose with W workers on this machine, with the split of each round
   into worker compute, coordinator work and waiting, the bytes the
   coordinator sends and receives, and the peak memory of every process.

Each system runs in a child process of its own (`runner`, `protocol`); this
process only starts and stops them, samples their memory and writes the
results into the run directory: `results.json` and the printed table.
Every process started here is stopped on exit, Ctrl-C and errors.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import time
from pathlib import Path

from shared import config as config_lib
from shared.errors import FedcomposeError, RunDirError, UsageError

log = logging.getLogger("fedcompose.bench")

QUICK = {
    "model": ["linear"],
    "clients_per_round": [10, 50],
    "workers": [1, 2],
    "hosted_clients": 200,
    "rounds": 2,
}
"""What `--quick` changes, unless given explicitly."""
MEMORY_CURVE = {"model": ["cnn"], "clients_per_round": [10, 100, 1000], "workers": [1], "rounds": 1}
"""What `--curves memory` measures, unless given explicitly."""


DESCRIPTION = (
    "Measure where a round's time goes, against the baselines users would pick: plain "
    "Keras over the same examples (compute floor), the same composed process in TFF's "
    "single-process local context, and fedcompose with each number of local workers, "
    "without and with mutual TLS (every worker behind its TLS proxy, as on other machines). "
    "Prints a table (medians over the measured rounds, after one warm-up round) and "
    "writes every round's figures as JSON into the run directory. Synthetic writers "
    "derived from the offline sklearn digits are built once and cached under "
    "--data-cache. --quick: "
    + ", ".join(f"{config_lib.settings.flag(k)} {v}" for k, v in QUICK.items())
    + "."
)


def _unless_given(config: config_lib.RunConfig, values: dict) -> None:
    for name, value in values.items():
        if name not in config.given:
            for section in ("model", "training", "federation", "bench"):
                if hasattr(getattr(config, section), name):
                    setattr(getattr(config, section), name, value)


def with_quick_defaults(config: config_lib.RunConfig) -> config_lib.RunConfig:
    """The grid `--quick` (or a memory curve) asks for, where the settings were
    not given explicitly; then the checks across settings."""
    if config.bench.quick:
        _unless_given(config, QUICK)
    if "memory" in config.bench.curves:
        _unless_given(config, MEMORY_CURVE)
    if config.bench.pinned and config.bench.curves:
        raise UsageError("--pinned measures the grid; leave out --curves")
    unknown = [c for c in config.bench.curves if c not in config_lib.BENCH_CURVES]
    if unknown:
        raise UsageError(
            f"--curves: unknown {', '.join(unknown)}; choose from "
            + ", ".join(config_lib.BENCH_CURVES)
        )
    try:
        hosted = [int(h) for h in config.bench.scale_hosted]
    except ValueError:
        raise UsageError(
            "--scale-hosted takes comma-separated integers, got "
            + ",".join(str(h) for h in config.bench.scale_hosted)
        ) from None
    if not hosted or min(hosted) < 2:
        raise UsageError("--scale-hosted takes numbers of hosted clients of at least 2")
    config.bench.scale_hosted = hosted
    b, t = config.bench, config.training
    unknown = [s for s in b.systems if s not in config_lib.BENCH_SYSTEMS]
    if unknown:
        raise UsageError(
            f"--systems: unknown {', '.join(unknown)}; choose from "
            + ", ".join(config_lib.BENCH_SYSTEMS)
        )
    known = {f"{m}/{c}" for m in config.model.model for c in t.clients_per_round}
    unknown = [v for v in b.skip if v not in known]
    if unknown:
        raise UsageError(f"--skip {','.join(unknown)}: not a MODEL/CLIENTS workload of this grid")
    if max(t.clients_per_round) > b.hosted_clients:
        raise UsageError(
            f"--clients-per-round {max(t.clients_per_round)} is more than the "
            f"{b.hosted_clients} --hosted-clients"
        )
    if max(config.federation.workers) > b.hosted_clients:
        raise UsageError("--workers: more workers than --hosted-clients")
    return config


def shard_counts(config: config_lib.RunConfig) -> list[int]:
    """Worker counts whose shards of --hosted-clients writers the bench reads.

    Built only those: `--curves scale` (which builds shards of its own sizes)
    built 912 MB of shards for a grid it never ran.
    """
    b, workers = config.bench, config.federation.workers
    if b.curves:
        return [workers[0]] if "memory" in b.curves else []
    counts = set()
    if {"keras", "tff_local", "client_loop"} & set(b.systems):
        counts.add(1)  # the single-process baselines read one shard set's files
    if {"fedcompose", "fedcompose_tls", "fedcompose_stratified", "fedcompose_unfused"} & set(
        b.systems
    ):
        counts.update(workers)
    return sorted(counts)


def _build_data(config: config_lib.RunConfig) -> dict[int, list[Path]]:
    from tqdm import tqdm

    from deploy.data import synthetic

    spec = synthetic.SyntheticSpec(
        writers=config.bench.hosted_clients,
        mean_train_examples=config.bench.examples_per_client,
        seed=config.data.data_seed,
    )
    cache = Path(config.bench.data_cache)
    counts = shard_counts(config)
    missing = [c for c in counts if not synthetic.is_built(spec, cache, c)]
    with tqdm(
        total=len(missing) * spec.writers,
        desc="building synthetic shards",
        unit="client",
        disable=not missing or not sys.stderr.isatty(),
        file=sys.stderr,
    ) as bar:
        return synthetic.build_shard_sets(spec, cache, counts, bar.update)


def _chaos(config: config_lib.RunConfig) -> int:
    """The chaos soak (`deploy.bench.chaos`) instead of the grid."""
    from deploy.bench import chaos

    given = config.given
    t, f = config.training, config.federation
    if "model" in given and config.model.model != ["linear"]:
        raise UsageError("--chaos runs the linear model only; leave out --model")
    plan = chaos.ChaosPlan(
        rounds=t.rounds if "rounds" in given else 200,
        workers=f.workers[0] if "workers" in given else 3,
        clients_per_round=t.clients_per_round[0] if "clients_per_round" in given else 10,
        every=config.bench.chaos_every,
        seed=t.seed,
        round_timeout=config.resilience.round_timeout,
    )
    if config.bench.pinned:
        raise UsageError("--pinned measures the grid; leave out --chaos")
    if plan.workers < 2:
        raise UsageError("--chaos needs --workers 2 or more (one always keeps serving)")
    run_dir = Path(
        config.output.run_dir
        or Path("bench-results") / f"chaos-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    )
    return chaos.run_soak(plan, run_dir)


def _make_run_dir(run_dir: Path) -> None:
    """The bench's directory, or one line saying why it cannot be (a file
    there was "File exists", exit 1)."""
    from shared import files

    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--run-dir {run_dir} exists and is not a directory; give a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"--run-dir {run_dir} cannot be created: {files.failure(e)}") from None


def run(config: config_lib.RunConfig) -> int:
    from shared import interrupts, logs

    if config.bench.chaos:
        if config.bench.pinned:
            raise UsageError("--pinned measures the grid; leave out --chaos")
        if config.output.run_dir:
            _make_run_dir(Path(config.output.run_dir))
        logs.setup(verbose=config.output.verbose, name="bench")
        interrupts.install()
        return _chaos(config)
    config = with_quick_defaults(config)
    run_dir = Path(
        config.output.run_dir or Path("bench-results") / f"{datetime.datetime.now():%Y%m%d-%H%M%S}"
    )
    _make_run_dir(run_dir)
    results_path = run_dir / "results.json"
    logs.setup(verbose=config.output.verbose, log_file=run_dir / "bench.log", name="bench")
    interrupts.install()

    from tqdm import tqdm

    from deploy.bench import report
    from deploy.bench.memory import MemorySampler
    from deploy.bench.plan import Plan
    from deploy.bench.runner import Runner, machine
    from deploy.data import synthetic
    from shared import files

    b, t = config.bench, config.training
    started = time.time()
    shard_sets = _build_data(config)
    plan = Plan(
        models=tuple(config.model.model),
        clients_per_round=tuple(t.clients_per_round),
        rounds=t.rounds,
        batch_size=t.batch_size,
        local_epochs=t.local_epochs,
        client_ids=tuple(
            synthetic.client_ids(
                synthetic.SyntheticSpec(writers=b.hosted_clients, seed=config.data.data_seed)
            )
        ),
        seed=t.seed,
        client_learning_rate=t.client_learning_rate,
        rpc_timeout=config.federation.rpc_timeout,
        skip=tuple(b.skip),
        worker_memory_mb=config.federation.worker_memory_mb,
    )
    if b.curves:
        return _curves(config, plan, shard_sets, run_dir)
    steps: list[tuple[str, int | None]] = [
        (system, None) for system in ("keras", "client_loop", "tff_local") if system in b.systems
    ]
    # With and without TLS (and fused and unfused) interleaved, per worker
    # count, so that both see the same machine load (it is shared and noisy).
    for workers in config.federation.workers:
        steps += [
            (system, workers)
            for system in (
                "fedcompose",
                "fedcompose_unfused",
                "fedcompose_tls",
                "fedcompose_stratified",
            )
            if system in b.systems
        ]
    total = len(list(plan.workloads())) * len(steps) * b.passes
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "pinning": _pinning(config),
        "settings": config.to_dict(("model", "training", "federation", "data", "bench")),
        "data": {
            "kind": "synthetic writers drawn from the sklearn digits",
            "hosted_clients": b.hosted_clients,
            "mean_train_examples": b.examples_per_client,
        },
    }
    bar = tqdm(
        total=total,
        unit="workload",
        dynamic_ncols=True,
        disable=not sys.stderr.isatty(),
        file=sys.stderr,
    )
    runner = None
    try:
        with MemorySampler() as sampler:
            runner = Runner(plan, run_dir, bar, sampler, pinned=b.pinned)
            for number in range(b.passes):
                runner.current_pass = number
                baselines = {
                    "keras": runner.keras,
                    "client_loop": runner.client_loop,
                    "tff_local": runner.tff_local,
                }
                for system, workers in steps if number % 2 == 0 else reversed(steps):
                    if system in baselines:
                        baselines[system](shard_sets[1])
                    else:
                        assert workers is not None
                        runner.fedcompose(workers, shard_sets[workers], system)
    finally:
        bar.close()
        if runner is not None:
            rows = list(runner.rows.values())
            results = report.assemble(rows, meta, time.time() - started)
            if runner.pinned:
                results["meta"]["affinity_seen"] = runner.affinity_seen
            files.write_atomic(results_path, json.dumps(results, indent=1))
            table = report.render(results)
            files.write_atomic(run_dir / "table.txt", table + "\n")
            report.plot_seconds_per_round(results, run_dir / "seconds_per_round.png")
            print(table, file=sys.stdout)
            print(f"\nresults: {results_path}", file=sys.stderr)
    failed = [r for r in runner.rows.values() if r.error] if runner else []
    return 1 if failed else 0


def _pinning(config: config_lib.RunConfig) -> dict | None:
    """Which core each measured process ran on, in pinned mode."""
    if not config.bench.pinned:
        return None
    from deploy.bench import pinning

    cores = len(pinning.available_cores())
    if max(config.federation.workers) > cores:
        log.warning(
            "--pinned with %d workers on %d cores: workers share cores round-robin, so "
            "those rows measure contention, not scaling",
            max(config.federation.workers),
            cores,
        )
    return {
        "keras": [pinning.single_core()],
        "tff_local": [pinning.single_core()],
        "workers": {
            str(w): [pinning.core_for_worker(i) for i in range(w)]
            for w in config.federation.workers
        },
        "coordinator": "unpinned",
    }


def _curves(config: config_lib.RunConfig, plan, shard_sets, run_dir: Path) -> int:
    """The cost curves (`deploy.bench.curves`) instead of the grid."""
    from tqdm import tqdm

    from deploy.bench import curves
    from deploy.bench.memory import MemorySampler
    from deploy.bench.runner import machine
    from shared import files

    results: dict = {
        "meta": {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine(),
            "settings": config.to_dict(("model", "training", "federation", "data", "bench")),
        }
    }
    total = (len(list(plan.workloads())) + len(plan.models)) * 2 * (
        "memory" in config.bench.curves
    ) + len(config.bench.scale_hosted) * ("scale" in config.bench.curves)
    lines = []
    memory_points: list[dict] = []
    scale_points: list[dict] = []
    failure: Exception | None = None
    try:
        with (
            MemorySampler() as sampler,
            tqdm(total=total, disable=not sys.stderr.isatty(), file=sys.stderr) as bar,
        ):
            if "memory" in config.bench.curves:
                curves.memory_curve(config, plan, shard_sets, run_dir, sampler, bar, memory_points)
            if "scale" in config.bench.curves:
                curves.scale_curve(config, run_dir, sampler, bar, scale_points)
    except (RuntimeError, LookupError, StopIteration, OSError) as e:
        failure = e
    finally:
        # Whatever was measured is kept, also on Ctrl-C or a failed point.
        c = curves
        for name, points, targets, plot, table in (
            ("memory", memory_points, c.memory_targets, c.plot_memory, c.memory_table),
            ("scale", scale_points, c.scale_targets, c.plot_scale, c.scale_table),
        ):
            if points:
                results[name] = {"points": points, "targets": targets(points)}
                plot(points, run_dir / f"{name}.png")
                lines += [*([""] if lines else []), table(points)]
                lines += curves.targets_lines(results[name])
        if failure is not None:
            results["incomplete"] = str(failure)
        files.write_atomic(run_dir / "curves.json", json.dumps(results, indent=1))
    if failure is not None:
        raise FedcomposeError(
            f"bench --curves stopped: {failure}; the points measured before it are in "
            f"{run_dir / 'curves.json'}"
        ) from None
    text = "\n".join(lines)
    files.write_atomic(run_dir / "curves.txt", text + "\n")
    print(text, file=sys.stdout)
    print(f"\nresults: {run_dir / 'curves.json'} (PNGs beside it)", file=sys.stderr)
    return 0
