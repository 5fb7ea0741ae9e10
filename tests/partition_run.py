"""Measures a run through a partition of every worker (docs/outages.md).

Two workers, each on a network namespace of its own (another host), serve the
default data; `fedcompose train` runs over them and, once AT rounds are
recorded, every packet to and from both hosts is dropped for SECONDS, then let
through again. Prints the run's exit code, each round's wait and attempts,
and the run's last lines.

    python tests/partition_run.py SECONDS AT WORK_DIR [fedcompose train flags...]

Needs root, iproute2 and iptables (as the tests in tests/netns.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rows(run_dir: Path) -> list[dict]:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def main() -> int:
    seconds, at, work = float(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    flags = sys.argv[4:]
    from deploy import workers as workers_lib
    from deploy.data import build
    from shared.config import DataConfig
    from tests import netns

    work.mkdir(parents=True, exist_ok=True)
    shards = build.build_shards(DataConfig(), work / "shards", 2)
    run_dir = work / "run"
    with netns.linked_hosts(2, block=9) as hosts:
        started = workers_lib.start_workers(
            shards,
            work / "logs",
            check="quick",
            prefix=lambda i: hosts[i].prefix(),
            extra_args=lambda i: ["--insecure-plaintext-network"],
        )
        cut = False
        proc = None
        try:
            addresses = ",".join(
                f"{h.address}:{w.port}" for h, w in zip(hosts, started, strict=True)
            )
            with open(work / "train.log", "w") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "deploy.cli", "train", "--addresses", addresses,
                     "--run-dir", str(run_dir), *flags],
                    cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                )  # fmt: skip
            while len(_rows(run_dir)) < at and proc.poll() is None:
                time.sleep(0.1)
            for host in hosts:
                host.cut_off()
            cut, cut_at = True, time.monotonic()
            print(f"partition of every worker after round {at}, for {seconds:g}s", flush=True)
            while time.monotonic() < cut_at + seconds and proc.poll() is None:
                time.sleep(0.2)
            for host in hosts:
                host.cut_off(False)
            cut = False
            print(f"mended after {time.monotonic() - cut_at:.0f}s", flush=True)
            code = proc.wait(timeout=3600)
        finally:
            if cut:
                for host in hosts:
                    host.cut_off(False)
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
            workers_lib.stop_workers(started)
    rows = _rows(run_dir)
    print(f"exit {code}; rounds recorded: {[r['round'] for r in rows]}")
    for r in rows:
        if r.get("waited_for_workers") or r.get("attempts", 1) > 1:
            print(
                f"round {r['round']}: waited {r['waited_for_workers']}s for workers, "
                f"attempts {r['attempts']}, degraded {r['degraded']}, retried {r['retried']}, "
                f"live workers {r['live_workers']}"
            )
    log = (work / "train.log").read_text().splitlines()
    print("\n".join(line for line in log if "waiting for workers" in line or "goes on" in line))
    print("\n".join(log[-3:]))
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
