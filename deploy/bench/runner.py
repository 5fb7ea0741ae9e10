"""Running the measured systems, one child process each, and collecting their rounds.

Each system (plain Keras, TFF in one process, the fedcompose coordinator)
runs in a child process of its own (see `protocol`); this process starts and
stops them and their workers, samples their memory and keeps every round.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("fedcompose.bench")

ROOT = Path(__file__).resolve().parents[2]


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


BASELINE_MODULES = {"keras": "keras_floor", "client_loop": "client_loop"}
"""The single-process baselines' child modules, by system."""


class Runner:
    """Runs the measured systems one after another and collects their rows."""

    def __init__(self, plan, work_dir: Path, bar, sampler, pinned: bool = False):
        self.plan = plan
        self.pinned = pinned
        """Pinned mode (`pinning`): workers on cores of their own, baselines on one."""
        self.affinity_seen: dict[str, list[int]] = {}
        """The cores each pinned process and its children were allowed, as read back."""
        self.work_dir = work_dir
        self.bar = bar
        self.sampler = sampler
        self.rows: dict[tuple, object] = {}
        self.current_pass = 0

    def _row(self, model: str, clients: int, system: str, workers: int | None):
        from deploy.bench.report import Row

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
        prefix: list[str] | None = None,
    ) -> None:
        """Runs one measured child process to its end, recording its events."""
        from deploy.bench import protocol as bench_protocol
        from shared import processes

        config_path = self.work_dir / f"{name}.json"
        config_path.write_text(json.dumps({"plan": self.plan.to_json(), **config}))
        log_path = self.work_dir / f"{name}.log"
        expected = {bench_protocol.workload_key(m, c) for m, c in self.plan.workloads()}
        done: set[str] = set()
        model_bytes: dict[str, int] = {}
        with open(log_path, "ab") as log_file:
            proc = processes.spawn(
                [*(prefix or []), sys.executable, "-m", module, str(config_path)],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=log_file,
                # SIGTERM lets a child stop what it started (TFF's own executor) first.
                death_signal=signal.SIGTERM,
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
                    if self.pinned:
                        self._record_affinity(f"{name}/main", proc.pid)
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

    def _record_affinity(self, name: str, pid: int) -> None:
        import psutil

        try:
            process = psutil.Process(pid)
            for p in [process, *process.children(recursive=True)]:
                self.affinity_seen[f"{name}/{p.name()}"] = sorted(p.cpu_affinity())
        except psutil.Error:
            pass

    def _baseline_prefix(self) -> list[str] | None:
        from deploy.bench import pinning

        return pinning.prefix([pinning.single_core()]) if self.pinned else None

    def _single_process(self, system: str, shard_dirs: list[Path]) -> None:
        """A baseline that trains in its own one process (no workers)."""
        self._child(
            system,
            f"deploy.bench.{BASELINE_MODULES[system]}",
            {"shard_dirs": [str(p) for p in shard_dirs]},
            system,
            None,
            lambda pid: self.sampler.watch("process", pid),
            self._baseline_prefix(),
        )

    def keras(self, shard_dirs: list[Path]) -> None:
        self._single_process("keras", shard_dirs)

    def client_loop(self, shard_dirs: list[Path]) -> None:
        self._single_process("client_loop", shard_dirs)

    def tff_local(self, shard_dirs: list[Path]) -> None:
        self._child(
            "tff_local",
            "deploy.bench.tff_local",
            {"shard_dirs": [str(p) for p in shard_dirs]},
            "tff_local",
            None,
            lambda pid: self.sampler.watch("process", pid, "process_executor"),
            self._baseline_prefix(),
        )

    def _tls_kits(self, workers: int) -> Path:
        """A throwaway federation for this benchmark: kits for workers on 127.0.0.1."""
        from deploy import provision

        kits = self.work_dir / "tls-kits"
        # One port each: two workers dialled at one address and port are refused.
        sites = {f"w{i}": (["127.0.0.1"], provision.DEFAULT_PORT + i) for i in range(workers)}
        provision.provision(kits, sites, valid_days=7)
        return kits

    def fedcompose(self, workers: int, shard_dirs: list[Path], system: str = "fedcompose") -> None:
        """fedcompose with `workers` local workers; as `fedcompose_tls`, every
        worker serves through its mutual-TLS proxy and the coordinator dials with
        its kit; as `fedcompose_stratified`, rounds sample by worker; as
        `fedcompose_unfused`, a worker's share of a round runs as calls per client."""
        from deploy import workers as workers_lib
        from deploy.bench import pinning

        tls = system == "fedcompose_tls"
        name = f"{system.replace('_', '-')}-w{workers}"
        logs_dir = self.work_dir / name
        kits = self._tls_kits(workers) if tls else None
        started = workers_lib.start_workers(
            shard_dirs,
            logs_dir,
            check="quick",
            ready_timeout=300.0,
            extra_args=(lambda i: ["--tls-dir", str(kits / f"w{i}")]) if kits else None,
            prefix=(lambda i: pinning.prefix([pinning.core_for_worker(i)]))
            if self.pinned
            else None,
        )
        try:
            if self.pinned:
                for w in started:
                    self._record_affinity(f"{name}/worker{w.index}", w.process.pid)

            def watch(pid: int) -> None:
                self.sampler.watch("coordinator", pid, "server_executor")
                for w in started:
                    role = f"worker{w.index}"
                    self.sampler.watch(role, w.process.pid, f"{role}_executor")

            self._child(
                name,
                "deploy.bench.fedcompose_child",
                {
                    "addresses": [w.address for w in started],
                    "log_dir": str(logs_dir),
                    "records_dir": str(logs_dir / "records"),
                    "tls_dir": str(kits / "coordinator") if kits else "",
                    "sampling": "stratified" if system == "fedcompose_stratified" else "uniform",
                    "fused": system != "fedcompose_unfused",
                },
                system,
                workers,
                watch,
            )
        finally:
            workers_lib.stop_workers(started)


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])[-400:]
