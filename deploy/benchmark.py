"""`fedcompose bench`: where a round's time goes, against the baselines.

In one run, on the same clients, data, model, batch size and local epochs:

1. compute floor: plain Keras over the union of each round's clients;
2. TFF in one process: the same composed process in TFF's local context;
3. fedcompose with W workers on this machine, with the split of each round
   into worker compute, coordinator work and waiting, the bytes the
   coordinator sends and receives, and the peak memory of every process.

Each system runs in a child process of its own (see `deploy/bench_protocol`);
this process only starts and stops them, samples their memory and writes the
results. Every process started here is stopped on exit, Ctrl-C and errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("fedcompose.bench")

ROOT = Path(__file__).resolve().parents[1]

FULL = {
    "models": "linear,cnn",
    "clients_per_round": "10,100,1000",
    "workers": "1,2,4",
    "hosted_clients": 3400,
    "rounds": 3,
}
QUICK = {
    "models": "linear",
    "clients_per_round": "10,50",
    "workers": "1,2",
    "hosted_clients": 200,
    "rounds": 2,
}
SYSTEMS = ("keras", "tff_local", "fedcompose")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="fedcompose bench")
    parser.description = (
        "Measure where a round's time goes, against the baselines users would pick: plain "
        "Keras over the same examples (compute floor), the same composed process in TFF's "
        "single-process local context, and fedcompose with each number of local workers. "
        "Prints a table (medians over the measured rounds, after one warm-up round) and "
        "writes every round's figures as JSON. Synthetic writers derived from the offline "
        "sklearn digits are built once and cached under --data-dir."
    )

    def option(name: str, full, quick, help_text: str, **kwargs) -> None:
        parser.add_argument(
            name,
            default=None,
            help=f"{help_text} (default: {full}; with --quick: {quick})",
            **kwargs,
        )

    option(
        "--models",
        FULL["models"],
        QUICK["models"],
        "models to measure, comma separated: linear, cnn",
    )
    option(
        "--clients-per-round",
        FULL["clients_per_round"],
        QUICK["clients_per_round"],
        "clients sampled per round, comma separated",
    )
    option(
        "--workers",
        FULL["workers"],
        QUICK["workers"],
        "numbers of fedcompose worker processes to measure, comma separated",
    )
    option(
        "--hosted-clients",
        FULL["hosted_clients"],
        QUICK["hosted_clients"],
        "synthetic writers hosted across the workers",
        type=int,
    )
    option(
        "--rounds",
        FULL["rounds"],
        QUICK["rounds"],
        "measured rounds per workload, after one warm-up round",
        type=int,
    )
    parser.add_argument(
        "--examples-per-client",
        type=int,
        default=24,
        help="mean training examples of a synthetic writer; each holds between half and "
        "1.5 times as many (default: 24)",
    )
    parser.add_argument("--batch-size", type=int, default=20, help="batch size (default: 20)")
    parser.add_argument(
        "--local-epochs", type=int, default=1, help="local epochs per client (default: 1)"
    )
    parser.add_argument(
        "--passes",
        type=int,
        default=1,
        help="run the whole grid this many times, every other pass in the reverse order of "
        "systems, and take medians over all passes: evens out drift in the machine's "
        "background load between systems measured early and late (default: 1)",
    )
    parser.add_argument(
        "--skip",
        default="",
        help="workloads to leave out, comma separated, as MODEL/CLIENTS (e.g. cnn/1000) "
        "(default: none)",
    )
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help="systems to measure, comma separated: keras (compute floor), tff_local, "
        f"fedcompose (default: {','.join(SYSTEMS)})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON results file (default: bench-results/<timestamp>.json)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path("bench-results/data"),
        help="where the synthetic shards are built and cached (default: bench-results/data)",
    )
    parser.add_argument("--seed", type=int, default=0, help="data and sampling seed (default: 0)")
    parser.add_argument(
        "--rpc-timeout",
        type=float,
        default=1800.0,
        help="deadline in seconds for any one call to a worker (default: 1800)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small grid that finishes in a few minutes (smoke test); options given "
        "explicitly still apply",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


@dataclasses.dataclass(frozen=True)
class Settings:
    models: tuple[str, ...]
    clients_per_round: tuple[int, ...]
    workers: tuple[int, ...]
    hosted_clients: int
    rounds: int
    examples_per_client: int
    batch_size: int
    local_epochs: int
    systems: tuple[str, ...]
    passes: int
    skip: tuple[str, ...]
    out: Path
    data_dir: Path
    seed: int
    rpc_timeout: float
    quick: bool


class UsageError(ValueError):
    pass


def _int_list(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{name} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"{name} takes positive integers, got {text!r}")
    return values


def _str_list(text: str, name: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    values = tuple(v.strip() for v in str(text).split(",") if v.strip())
    unknown = [v for v in values if v not in allowed]
    if not values or unknown:
        raise UsageError(f"{name}: choose from {', '.join(allowed)} (got {text!r})")
    return values


def resolve(args: argparse.Namespace) -> Settings:
    from shared.model_names import MODELS

    base = QUICK if args.quick else FULL

    def pick(name: str):
        value = getattr(args, name)
        return base[name] if value is None else value

    settings = Settings(
        models=_str_list(pick("models"), "--models", tuple(MODELS)),
        clients_per_round=_int_list(pick("clients_per_round"), "--clients-per-round"),
        workers=_int_list(pick("workers"), "--workers"),
        hosted_clients=int(pick("hosted_clients")),
        rounds=int(pick("rounds")),
        examples_per_client=args.examples_per_client,
        batch_size=args.batch_size,
        local_epochs=args.local_epochs,
        systems=_str_list(args.systems, "--systems", SYSTEMS),
        passes=args.passes,
        skip=tuple(v.strip() for v in args.skip.split(",") if v.strip()),
        out=args.out or Path("bench-results") / f"{datetime.datetime.now():%Y%m%d-%H%M%S}.json",
        data_dir=args.data_dir,
        seed=args.seed,
        rpc_timeout=args.rpc_timeout,
        quick=args.quick,
    )
    known = {f"{m}/{c}" for m in settings.models for c in settings.clients_per_round}
    unknown = [v for v in settings.skip if v not in known]
    if unknown:
        raise UsageError(f"--skip {','.join(unknown)}: not a MODEL/CLIENTS workload of this grid")
    if settings.rounds < 1:
        raise UsageError("--rounds must be at least 1")
    if settings.passes < 1:
        raise UsageError("--passes must be at least 1")
    if max(settings.clients_per_round) > settings.hosted_clients:
        raise UsageError(
            f"--clients-per-round {max(settings.clients_per_round)} is more than the "
            f"{settings.hosted_clients} --hosted-clients"
        )
    if max(settings.workers) > settings.hosted_clients:
        raise UsageError("more workers than hosted clients")
    for name in ("examples_per_client", "batch_size", "local_epochs"):
        if getattr(settings, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    return settings


def machine() -> dict:
    import psutil

    from shared import executor_binary

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import tensorflow as tf

        tf_version = tf.__version__
    except ImportError:  # pragma: no cover
        tf_version = "unknown"
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu": cpu,
        "python": platform.python_version(),
        "tff": executor_binary.tff_version(),
        "tensorflow": tf_version,
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()),
    }


class Runner:
    """Runs the measured systems one after another and collects their rows."""

    def __init__(self, settings: Settings, plan, work_dir: Path, bar, sampler):
        self.settings = settings
        self.plan = plan
        self.work_dir = work_dir
        self.bar = bar
        self.sampler = sampler
        self.rows: dict[tuple, object] = {}
        self.current_pass = 0

    def _row(self, model: str, clients: int, system: str, workers: int | None):
        from deploy.bench_report import Row

        key = (model, clients, system, workers)
        if key not in self.rows:
            self.rows[key] = Row(model, clients, system, workers)
        return self.rows[key]

    def _child(
        self,
        name: str,
        module: str,
        config: dict,
        system: str,
        workers: int | None,
        watch: Callable[[int], None],
    ) -> None:
        """Runs one measured child process to its end, recording its events."""
        from deploy import bench_protocol
        from shared import processes

        config_path = self.work_dir / f"{name}.json"
        config_path.write_text(json.dumps({"plan": self.plan.to_json(), **config}))
        log_path = self.work_dir / f"{name}.log"
        expected = {bench_protocol.workload_key(m, c) for m, c in self.plan.workloads()}
        done: set[str] = set()
        model_bytes: dict[str, int] = {}
        with open(log_path, "ab") as log_file:
            proc = processes.spawn(
                [sys.executable, "-m", module, str(config_path)],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=log_file,
                death_signal=signal_for_children(),
            )
        try:
            watch(proc.pid)
            assert proc.stdout is not None
            for raw in proc.stdout:
                event = bench_protocol.parse(raw.decode(errors="replace"))
                if event is None:
                    continue
                kind = event["event"]
                if kind == "model":
                    model_bytes[event["model"]] = event["model_bytes"]
                    continue
                model, clients = event["workload"].split("/")
                row = self._row(model, int(clients), system, workers)
                phase = f"{name}:{event['workload']}"
                if kind == "start":
                    row.load_average_at_start = max(
                        os.getloadavg()[0], row.load_average_at_start or 0.0
                    )
                    self.sampler.set_phase(phase)
                    self.bar.set_description(f"{model} {clients} clients {name}")
                elif kind == "round":
                    row.rounds.append({**event, "pass": self.current_pass})
                    self.bar.set_postfix(round=event["round"], s=f"{event['seconds']:.2f}")
                elif kind == "end":
                    row.load_average_at_end = max(
                        os.getloadavg()[0], row.load_average_at_end or 0.0
                    )
                    self.sampler.set_phase(None)
                    for role, peak in self.sampler.peaks(phase).items():
                        row.memory[role] = max(peak, row.memory.get(role, 0))
                    row.memory_hwm = self.sampler.high_water_marks()
                    row.model_bytes = model_bytes.get(model)
                    done.add(event["workload"])
                    self.bar.update(1)
            code = proc.wait()
        finally:
            self.sampler.set_phase(None)
            processes.stop(proc, grace=10.0)
            self.sampler.unwatch_all()
        missing = sorted(expected - done)
        if missing:
            reason = f"{name} exited with code {code}: {_tail(log_path)} (log: {log_path})"
            log.error("%s", reason)
            for key in missing:
                model, clients = key.split("/")
                self._row(model, int(clients), system, workers).error = reason
                self.bar.update(1)

    def keras(self, shard_dirs: list[Path]) -> None:
        self._child(
            "keras",
            "deploy.bench_keras",
            {"shard_dirs": [str(p) for p in shard_dirs]},
            "keras",
            None,
            lambda pid: self.sampler.watch("process", pid),
        )

    def tff_local(self, shard_dirs: list[Path]) -> None:
        self._child(
            "tff_local",
            "deploy.bench_tff_local",
            {"shard_dirs": [str(p) for p in shard_dirs]},
            "tff_local",
            None,
            lambda pid: self.sampler.watch("process", pid, "process_executor"),
        )

    def fedcompose(self, workers: int, shard_dirs: list[Path]) -> None:
        from deploy import workers as workers_lib

        name = f"fedcompose-w{workers}"
        logs_dir = self.work_dir / name
        started = workers_lib.start_workers(
            shard_dirs, logs_dir, check="quick", ready_timeout=300.0
        )
        try:

            def watch(pid: int) -> None:
                self.sampler.watch("coordinator", pid, "server_executor")
                for w in started:
                    role = f"worker{w.index}"
                    self.sampler.watch(role, w.process.pid, f"{role}_executor")

            self._child(
                name,
                "deploy.bench_fedcompose",
                {"addresses": [w.address for w in started], "log_dir": str(logs_dir)},
                "fedcompose",
                workers,
                watch,
            )
        finally:
            workers_lib.stop_workers(started)


def signal_for_children() -> int:
    import signal

    # SIGTERM lets a child stop what it started (TFF's own executor) first.
    return signal.SIGTERM


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])[-400:]


def _build_data(settings: Settings) -> dict[int, list[Path]]:
    from tqdm import tqdm

    from deploy import bench_data

    spec = bench_data.SyntheticSpec(
        writers=settings.hosted_clients,
        mean_train_examples=settings.examples_per_client,
        seed=settings.seed,
    )
    counts = sorted({1, *settings.workers})
    missing = [c for c in counts if not bench_data.is_built(spec, settings.data_dir, c)]
    with tqdm(
        total=len(missing) * spec.writers,
        desc="building synthetic shards",
        unit="client",
        disable=not missing or not sys.stderr.isatty(),
        file=sys.stderr,
    ) as bar:
        return bench_data.build_shard_sets(spec, settings.data_dir, counts, bar.update)


def run(args: argparse.Namespace) -> int:
    from coordinator.session import sigterm_as_interrupt
    from shared import logs

    try:
        settings = resolve(args)
    except UsageError as e:
        print(f"fedcompose bench: error: {e}", file=sys.stderr)
        return 2
    settings.out.parent.mkdir(parents=True, exist_ok=True)
    work_dir = settings.out.with_suffix("")
    work_dir.mkdir(parents=True, exist_ok=True)
    logs.setup(verbose=args.verbose, log_file=work_dir / "bench.log", name="bench")
    sigterm_as_interrupt()

    from tqdm import tqdm

    from deploy import bench_data, bench_report
    from deploy.bench_memory import MemorySampler
    from deploy.bench_plan import Plan

    started = time.time()
    shard_sets = _build_data(settings)
    spec_ids = bench_data.client_ids(
        bench_data.SyntheticSpec(writers=settings.hosted_clients, seed=settings.seed)
    )
    plan = Plan(
        models=settings.models,
        clients_per_round=settings.clients_per_round,
        rounds=settings.rounds,
        batch_size=settings.batch_size,
        local_epochs=settings.local_epochs,
        client_ids=tuple(spec_ids),
        seed=settings.seed,
        rpc_timeout=settings.rpc_timeout,
        skip=settings.skip,
    )
    steps: list[tuple[str, int | None]] = [
        (system, None) for system in ("keras", "tff_local") if system in settings.systems
    ]
    if "fedcompose" in settings.systems:
        steps += [("fedcompose", workers) for workers in settings.workers]
    total = len(list(plan.workloads())) * len(steps) * settings.passes
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in dataclasses.asdict(settings).items()
        },
        "data": {
            "kind": "synthetic writers drawn from the sklearn digits",
            "hosted_clients": settings.hosted_clients,
            "mean_train_examples": settings.examples_per_client,
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
            runner = Runner(settings, plan, work_dir, bar, sampler)
            for number in range(settings.passes):
                runner.current_pass = number
                for system, workers in steps if number % 2 == 0 else reversed(steps):
                    if system == "keras":
                        runner.keras(shard_sets[1])
                    elif system == "tff_local":
                        runner.tff_local(shard_sets[1])
                    else:
                        assert workers is not None
                        runner.fedcompose(workers, shard_sets[workers])
    finally:
        bar.close()
        if runner is not None:
            rows = list(runner.rows.values())
            results = bench_report.assemble(rows, meta, time.time() - started)
            settings.out.write_text(json.dumps(results, indent=1))
            print(bench_report.render(results), file=sys.stdout)
            print(f"\nresults: {settings.out}", file=sys.stderr)
    failed = [r for r in runner.rows.values() if r.error] if runner else []
    return 1 if failed else 0
