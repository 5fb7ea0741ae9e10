"""`fedcompose bench --chaos`: a bounded soak of a run that loses workers.

Runs `fedcompose run` (local workers, the launcher restarting crashed ones)
for `--rounds` rounds of the linear model, and meanwhile, every few rounds
(`--chaos-every` on average), does one of these to a random worker that is
serving, keeping at least one serving:

    kill-executor   SIGKILL its `worker_binary` (the worker exits; the launcher restarts it)
    kill-worker     SIGKILL the worker process (its executor dies with it)
    stop            SIGSTOP its `worker_binary` for 0.3 to 2.5 round deadlines, then SIGCONT

and once, half-way, SIGKILLs the coordinator itself right after such a fault
and runs the same command again, which must resume after its last checkpoint.
The last fifth of the rounds has no fault, for the federation to heal.
At the end it checks that every round is recorded once, that the checkpoints
are all there, and that no process outlived the soak, and reports the rounds
degraded, clients lost, the time each fault took to recover from (from the
fault until a round included the worker's clients again) and the share of
rounds each worker served (its partial made it into the round): a worker
that rejoins must stay in.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil

from shared import files

log = logging.getLogger("fedcompose.bench")

ROOT = Path(__file__).resolve().parents[2]
TAG = "FEDCOMPOSE_CHAOS_TAG"
KINDS = ("kill-executor", "kill-worker", "stop")
QUIET_TAIL = 0.2
"""No fault in the last fifth of the rounds: the soak also shows the federation
healing, every worker back before the end (and in the final evaluation)."""


@dataclasses.dataclass
class Fault:
    kind: str
    worker: int
    at: float
    round: int
    """Rounds recorded when it was done."""
    seconds: float = 0.0
    """How long a stop lasted."""
    recovered_at: float | None = None


@dataclasses.dataclass
class ChaosPlan:
    rounds: int = 200
    workers: int = 3
    clients_per_round: int = 10
    every: int = 6
    seed: int = 0
    round_timeout: float = 3.0
    kill_coordinator: bool = True


def _rows(run_dir: Path) -> list[dict]:
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def _serving(run_proc: subprocess.Popen) -> dict[int, tuple[psutil.Process, psutil.Process]]:
    """Worker index -> (worker process, its worker_binary), for workers that serve
    and are not stopped."""
    found = {}
    try:
        children = psutil.Process(run_proc.pid).children()
    except psutil.Error:
        return found
    for child in children:
        try:
            cmdline = child.cmdline()
            if "worker" not in cmdline or "--shard" not in cmdline:
                continue
            index = int(Path(cmdline[cmdline.index("--shard") + 1]).name.split("-")[-1])
            binaries = [c for c in child.children() if "worker_binary" in " ".join(c.cmdline())]
            if binaries and binaries[0].status() != psutil.STATUS_STOPPED:
                found[index] = (child, binaries[0])
        except (psutil.Error, ValueError, IndexError):
            continue
    return found


def served(rows: list[dict], workers: int) -> dict[str, dict]:
    """Per worker: rounds it served (its partial made it into the round) and
    rounds it was up in (its clients could be drawn), of all rounds recorded."""
    figures = {}
    for i in range(workers):
        label = f"worker{i}"
        n = sum(
            1
            for r in rows
            if label in r.get("workers", {}) and label not in r.get("workers_lost", {})
        )
        up = sum(1 for r in rows if i in r.get("live_workers", []))
        figures[label] = {
            "rounds_served": n,
            "rounds_up": up,
            "share_served": round(n / len(rows), 3) if rows else 0.0,
        }
    return figures


def _tagged(tag: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get(TAG) == tag and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


class Soak:
    def __init__(self, plan: ChaosPlan, work_dir: Path):
        self.plan = plan
        self.work_dir = work_dir
        self.run_dir = work_dir / "run"
        self.rng = random.Random(plan.seed)
        self.tag = uuid.uuid4().hex
        self.faults: list[Fault] = []
        self.stopped: dict[int, psutil.Process] = {}
        self.coordinator_kill: dict | None = None
        self.starts = 0
        self._timers: list[threading.Timer] = []

    def command(self) -> list[str]:
        p = self.plan
        return [
            sys.executable, "-m", "deploy.cli", "run",
            "--workers", str(p.workers), "--rounds", str(p.rounds),
            "--clients-per-round", str(p.clients_per_round), "--eval-every", "50",
            "--round-timeout", str(p.round_timeout), "--retry-wait", "3",
            "--round-retries", "5", "--probe-interval", "0.5", "--probe-interval-max", "4",
            "--worker-restarts", "1000", "--restart-backoff", "0.5", "--shard-check", "quick",
            "--run-dir", str(self.run_dir),
        ]  # fmt: skip

    def _start(self) -> subprocess.Popen:
        self.starts += 1
        # A crash of the coordinator leaves the stacks of its threads in the log.
        env = dict(os.environ, **{TAG: self.tag, "PYTHONFAULTHANDLER": "1"})
        log_path = self.work_dir / f"run-{self.starts}.log"
        with open(log_path, "w") as out:
            return subprocess.Popen(
                self.command(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )  # fmt: skip

    def run(self) -> dict:
        started = time.time()
        proc = self._start()
        next_fault = self._gap()
        quiet_from = self.plan.rounds * (1 - QUIET_TAIL)
        kill_coordinator_at = self.plan.rounds // 2 if self.plan.kill_coordinator else None
        # The kill follows the first fault from half-way on; should no fault take
        # (fewer than two workers serving each time), it comes on its own by
        # then, so that every soak resumes once.
        kill_by = min(quiet_from, (kill_coordinator_at or 0) + self.plan.every)
        training_after = 0  # rows recorded when the running coordinator started
        try:
            while True:
                code = proc.poll()
                done = len(_rows(self.run_dir))
                if code is not None:
                    if self.coordinator_kill is not None and proc is self.coordinator_kill["proc"]:
                        proc = self._start()
                        self.coordinator_kill["proc"] = None
                        # Its workers are starting: faults wait for its first round (a
                        # worker killed before it is ready fails the start, by design).
                        training_after = done
                        continue
                    break
                fault = None
                if done >= next_fault and done < quiet_from and done > training_after:
                    time.sleep(self.rng.uniform(0.0, 0.3))  # mid-round or between rounds
                    fault = self._inject(proc, done)
                    # A fault that could not be made (fewer than two workers
                    # serving) stays due: fast rounds would otherwise run past
                    # every planned fault while a killed worker restarts.
                    if fault is not None:
                        next_fault = done + self._gap()
                if kill_coordinator_at is not None and (
                    (fault is not None and done >= kill_coordinator_at) or done >= kill_by
                ):
                    kill_coordinator_at = None
                    self._kill_coordinator(proc, done, after_fault=fault is not None)
                time.sleep(0.05)
        finally:
            self._continue_all()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        wall = time.time() - started
        return self._report(proc.returncode, wall)

    def _gap(self) -> int:
        every = self.plan.every
        return self.rng.randint(max(1, every // 2), every + every // 2)

    def _inject(self, proc: subprocess.Popen, done: int) -> Fault | None:
        serving = _serving(proc)
        if len(serving) < 2:
            return None  # keep one serving: a soak of failures, not of an empty federation
        index = self.rng.choice(sorted(serving))
        worker, binary = serving[index]
        kind = self.rng.choice(KINDS)
        fault = Fault(kind, index, time.time(), done)
        try:
            if kind == "kill-executor":
                binary.kill()
            elif kind == "kill-worker":
                worker.kill()
            else:
                # From well within the round deadline to well past it.
                timeout = self.plan.round_timeout
                fault.seconds = round(self.rng.uniform(0.3 * timeout, 2.5 * timeout), 2)
                binary.suspend()
                self.stopped[index] = binary
                timer = threading.Timer(fault.seconds, self._continue, args=(index, binary))
                timer.daemon = True
                self._timers.append(timer)
                timer.start()
        except psutil.Error:
            return None
        self.faults.append(fault)
        log.info("round %d: %s worker %d", done, kind, index)
        return fault

    def _continue(self, index: int, binary: psutil.Process) -> None:
        if self.stopped.get(index) is binary:
            del self.stopped[index]
        try:
            binary.resume()
        except psutil.Error:
            pass

    def _continue_all(self) -> None:
        for timer in self._timers:
            timer.cancel()
        for index, binary in list(self.stopped.items()):
            self._continue(index, binary)

    def _kill_coordinator(self, proc: subprocess.Popen, done: int, after_fault: bool) -> None:
        """SIGKILLs the launcher and coordinator (its workers die with it); the
        soak then runs the same command again, which resumes."""
        self._continue_all()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        at = time.time()
        # Its workers follow it (PR_SET_PDEATHSIG); none may outlive it.
        deadline = time.monotonic() + 20
        while _tagged(self.tag) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.coordinator_kill = {
            "proc": proc,
            "at": at,
            "rounds_recorded": len(_rows(self.run_dir)),
            "orphans": len(_tagged(self.tag)),
            "after_fault_at_round": done if after_fault else None,
        }
        log.info("round %d: SIGKILL of the coordinator", done)

    def _checkpoints(self) -> list[int]:
        directory = self.run_dir / "checkpoints"
        versions = []
        for path in directory.iterdir() if directory.exists() else []:
            name = path.name
            if name.startswith("round_") and name[len("round_") :].isdigit():
                versions.append(int(name[len("round_") :]))
        return sorted(versions)

    def _report(self, returncode: int | None, wall: float) -> dict:
        time.sleep(1.0)
        orphans = [p.pid for p in _tagged(self.tag)]
        rows = _rows(self.run_dir)
        status = json.loads((self.run_dir / "status.json").read_text())
        by_round = {r["round"]: r for r in rows}
        recover, across_kill = [], []
        kill_at = (self.coordinator_kill or {}).get("at")
        for fault in self.faults:
            label = f"worker{fault.worker}"
            back = [r for r in rows if r.get("finished_at", 0) > fault.at and label in r["workers"]]
            if back:
                fault.recovered_at = back[0]["finished_at"]
                spans_kill = kill_at is not None and fault.at <= kill_at <= fault.recovered_at
                (across_kill if spans_kill else recover).append(fault.recovered_at - fault.at)
        leftover = [p for p in self.run_dir.rglob(".*.tmp-*")]
        kill = self.coordinator_kill or {}
        resumed_at = None
        if kill:
            after = [r for r in rows if r.get("finished_at", 0) > kill["at"]]
            resumed_at = after[0]["finished_at"] - kill["at"] if after else None
        checkpoints = self._checkpoints()
        rounds = self.plan.rounds
        report = {
            "command": " ".join(self.command()[2:]),
            "returncode": returncode,
            "wall_seconds": round(wall, 1),
            "rounds": len(rows),
            "rounds_recorded_once_in_order": [r["round"] for r in rows]
            == list(range(1, rounds + 1)),
            "state": status.get("state"),
            "faults": {k: sum(1 for f in self.faults if f.kind == k) for k in KINDS},
            "rounds_degraded": sum(1 for r in rows if r.get("degraded")),
            "rounds_with_a_worker_down": sum(
                1 for r in rows if len(r.get("live_workers", [])) < r.get("workers_total", 0)
            ),
            "rounds_retried": sum(1 for r in rows if r.get("attempts", 1) > 1),
            "rounds_refinished": sum(1 for r in rows if r.get("refinished")),
            "clients_lost": sum(r.get("clients_lost", 0) for r in rows),
            "workers_served": served(rows, self.plan.workers),
            "clients_sampled": sum(r.get("clients_sampled", 0) for r in rows),
            "recover_seconds": {
                "faults_recovered": len(recover),
                "faults": len(self.faults),
                "faults_recovered_across_the_coordinator_kill": len(across_kill),
                "max_across_the_coordinator_kill": round(max(across_kill), 1)
                if across_kill
                else None,
                "median": round(statistics.median(recover), 2) if recover else None,
                "p90": round(sorted(recover)[int(0.9 * (len(recover) - 1))], 2)
                if recover
                else None,
                "max": round(max(recover), 2) if recover else None,
            },
            "coordinator_kill_planned": self.plan.kill_coordinator,
            "coordinator_kill": {
                "at_round": kill.get("rounds_recorded"),
                "orphans_after_it": kill.get("orphans"),
                "seconds_to_next_round_after_resume": round(resumed_at, 1) if resumed_at else None,
            }
            if kill
            else None,
            "checkpoints": checkpoints,
            "checkpoints_ok": bool(checkpoints) and checkpoints[-1] == rounds,
            "leftover_temporaries": [str(p) for p in leftover],
            "orphans": orphans,
            "final_eval": by_round.get(rounds, {}).get("eval"),
            "workers_up_in_the_last_round": len(by_round.get(rounds, {}).get("live_workers", [])),
            "fault_log": [dataclasses.asdict(f) for f in self.faults],
        }
        return report


def render(report: dict) -> str:
    r, rec = report, report["recover_seconds"]
    kill = r["coordinator_kill"] or {}
    final = r["final_eval"] or {}
    lines = [
        f"chaos soak: {r['rounds']} rounds in {r['wall_seconds']:.0f}s, run {r['state']} "
        f"(exit {r['returncode']}); every round recorded once: "
        f"{'yes' if r['rounds_recorded_once_in_order'] else 'NO'}",
        "faults: "
        + ", ".join(f"{n} {k}" for k, n in r["faults"].items())
        + (f", 1 coordinator SIGKILL at round {kill.get('at_round')}" if kill else ""),
        f"rounds degraded (lost partials): {r['rounds_degraded']}; run with a worker down: "
        f"{r['rounds_with_a_worker_down']}; retried: {r['rounds_retried']}; finisher replaced: "
        f"{r['rounds_refinished']}",
        f"clients lost: {r['clients_lost']} of {r['clients_sampled']} sampled",
        "rounds each worker served (up in): "
        + ", ".join(
            f"{label} {w['rounds_served']}/{r['rounds']} ({100 * w['share_served']:.0f} %, up in "
            f"{w['rounds_up']})"
            for label, w in r["workers_served"].items()
        ),
        f"time to recover (fault -> worker's clients in a round again): median {rec['median']}s, "
        f"p90 {rec['p90']}s, max {rec['max']}s over {rec['faults_recovered']} of "
        f"{rec['faults']} faults; {rec['faults_recovered_across_the_coordinator_kill']} more "
        "recovered only after the coordinator's restart (up to "
        f"{rec['max_across_the_coordinator_kill']}s); the rest not before the end",
    ]
    if kill:
        lines.append(
            f"coordinator SIGKILL: {kill.get('orphans_after_it')} processes outlived it; "
            f"first round after the resume {kill.get('seconds_to_next_round_after_resume')}s "
            "after the kill"
        )
    lines += [
        f"checkpoints: {r['checkpoints']} ({'ok' if r['checkpoints_ok'] else 'MISSING'}), "
        f"temporaries left: {len(r['leftover_temporaries'])}; orphans: {len(r['orphans'])}",
        f"final held-out accuracy {final.get('accuracy', float('nan')):.4f} on "
        f"{final.get('examples', 0)} examples; {r['workers_up_in_the_last_round']} workers up "
        "in the last round",
    ]
    return "\n".join(lines)


def ok(report: dict) -> bool:
    return (
        report["returncode"] == 0
        and report["rounds_recorded_once_in_order"]
        and report["state"] == "finished"
        and report["checkpoints_ok"]
        and not report["leftover_temporaries"]
        and not report["orphans"]
        and not (report["coordinator_kill"] or {}).get("orphans_after_it")
        and (report["coordinator_kill"] is not None or not report["coordinator_kill_planned"])
    )


def run_soak(plan: ChaosPlan, work_dir: Path) -> int:
    work_dir.mkdir(parents=True, exist_ok=True)
    report = Soak(plan, work_dir).run()
    files.write_atomic(work_dir / "chaos.json", json.dumps(report, indent=1))
    print(render(report))
    print(f"\nresults: {work_dir / 'chaos.json'}", file=sys.stderr)
    return 0 if ok(report) else 1
