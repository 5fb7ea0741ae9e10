"""What one federation serving a sweep saves against separate runs.

    python -m deploy.bench.sweep [--trainings 4] [--rounds 5] [--workers 3]

Runs the same sweep twice, one after the other, on the default data and
fedcompose's own algorithm, one training per seed:

* separately, as a user of the command line does: `fedcompose run --seed S`
  for each seed (each starts Python, TensorFlow, its workers and its
  coordinator, and stops them);
* in one federation from Python: `LocalFederation` once, then
  `federation.train(seed=S)` for each seed, the workers running throughout.

Each mode gets a compile cache of its own that starts empty, so both build
the algorithm once and load it after. Prints the wall time of each and the
saving per training. Figures vary with the machine's load: compare the two
of one run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def separate(trainings: int, rounds: int, workers: int, base: Path) -> float:
    env = {**os.environ, "FEDCOMPOSE_CACHE_DIR": str(base / "cache-separate")}
    started = time.perf_counter()
    for seed in range(trainings):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "deploy.cli",
                "run",
                "--workers",
                str(workers),
                "--rounds",
                str(rounds),
                "--seed",
                str(seed),
                "--eval-every",
                "0",
                "--run-dir",
                str(base / f"separate-{seed}"),
            ],
            cwd=ROOT,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=1800,
        )
    return time.perf_counter() - started


def together(trainings: int, rounds: int, workers: int, base: Path) -> float:
    script = f"""
import fedcompose
with fedcompose.LocalFederation(workers={workers}, progress=False) as federation:
    for seed in range({trainings}):
        federation.train(rounds={rounds}, seed=seed, eval_every=0,
                         run_dir={str(base)!r} + f"/together-{{seed}}")
"""
    env = {**os.environ, "FEDCOMPOSE_CACHE_DIR": str(base / "cache-together")}
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=1800,
    )
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainings", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedcompose-sweep-") as tmp:
        base = Path(tmp)
        apart = separate(args.trainings, args.rounds, args.workers, base)
        one = together(args.trainings, args.rounds, args.workers, base)
    n = args.trainings
    print(
        f"{n} trainings of {args.rounds} rounds, {args.workers} workers, default data:\n"
        f"  separate `fedcompose run`s:      {apart:7.1f} s ({apart / n:.1f} s each)\n"
        f"  one federation, train() x {n}:    {one:7.1f} s ({one / n:.1f} s each)\n"
        f"  saved: {apart - one:.1f} s ({(apart - one) / n:.1f} s per training, "
        f"{100 * (1 - one / apart):.0f}%)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
