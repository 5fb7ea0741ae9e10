"""What one checkpoint costs, in the format a run writes and in TFF's.

    python -m deploy.bench.checkpoint_cost RUN_DIR [REPEATS]

Takes the server state of RUN_DIR's newest checkpoint (any format) and saves
it REPEATS times (default 20) each way into a scratch directory beside it:
with TFF's `FileProgramStateManager` (a SavedModel, what runs wrote before)
and with `RunDirectory.save_leaves` (one uncompressed npz of the leaves,
flushed and renamed, what runs write now). Prints the median seconds of
each and checks that the npz reads back bit for bit.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _leaves(run_dir: Path) -> list[np.ndarray]:
    from coordinator.run_dir import CHECKPOINT_FILE, RunDirectory

    run = RunDirectory(run_dir)
    version = run.latest_checkpoint()
    if version is None:
        raise SystemExit(f"{run_dir} holds no checkpoint")
    path = run.checkpoint_path(version)
    if (path / CHECKPOINT_FILE).exists():
        with np.load(path / CHECKPOINT_FILE, allow_pickle=False) as z:
            count = sum(1 for name in z.files if name.startswith("leaf_"))
            return [z[f"leaf_{i}"] for i in range(count)]
    import tensorflow as tf
    from tensorflow_federated.python.program import file_utils

    return [np.asarray(x) for x in tf.nest.flatten(asyncio.run(file_utils.read_saved_model(path)))]


def main(run_dir: str, repeats: int = 20) -> int:
    import tensorflow_federated as tff

    from coordinator.run_dir import RunDirectory, state_leaves

    leaves = _leaves(Path(run_dir))
    size = sum(a.nbytes for a in leaves)
    scratch = Path(tempfile.mkdtemp(prefix="checkpoint-cost-", dir=run_dir))
    try:
        tff_seconds, npz_seconds, copy_seconds = [], [], []
        manager = tff.program.FileProgramStateManager(str(scratch / "tff"), keep_total=2)
        run = RunDirectory(scratch / "npz", keep_checkpoints=1)
        (scratch / "npz").mkdir()
        for version in range(1, repeats + 1):
            started = time.perf_counter()
            asyncio.run(manager.save(leaves, version))
            tff_seconds.append(time.perf_counter() - started)
            started = time.perf_counter()
            copied = state_leaves(leaves)  # what the trainer copies for the writer
            copy_seconds.append(time.perf_counter() - started)
            started = time.perf_counter()
            run.save_leaves(version, copied)
            npz_seconds.append(time.perf_counter() - started)
        restored = run.restore(leaves)
        assert restored is not None and all(
            np.array_equal(a, b) and a.dtype == b.dtype
            for a, b in zip(restored[1], leaves, strict=True)
        ), "the npz checkpoint did not read back bit for bit"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(
        f"{len(leaves)} tensors, {size / 1e6:.2f} MB; median of {repeats}: "
        f"TFF FileProgramStateManager {statistics.median(tff_seconds) * 1000:.1f} ms, "
        f"npz (written aside, fsynced, renamed) {statistics.median(npz_seconds) * 1000:.1f} ms, "
        f"copy for the writer {statistics.median(copy_seconds) * 1000:.2f} ms; "
        "npz reads back bit for bit"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], *(int(a) for a in sys.argv[2:3])))
