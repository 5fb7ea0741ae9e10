"""A user's learning process run the way TFF's tutorials run it: one process,
TFF's local C++ context, `process.next(state, client_data)` per round.

This is the ground truth a run across the workers is compared with: the same
process (composed with the same dataset computation, so each client's
dataset is made from the same file by the same preprocessing), the same
sampled clients per round and the same shuffle seeds, over a view in which
every shard's client files are visible.

It runs in a child process. TFF's local context must own the process's
default context, its working directory and an executor service of its own;
in a notebook or beside a running federation, all three are taken. The
child gets the process as TFF's serialized computations (`initialize`,
`next`, `get_model_weights`), so no user code needs to be importable there.

    result = fedcompose.tff_reference.run(process, preprocess=..., shard_dirs=...,
                                          rounds=3, clients_per_round=10, seed=0)
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared import processes
from shared.config import SAMPLINGS
from shared.errors import UsageError

CHILD_TIMEOUT = 3600.0
"""The whole reference run's deadline (it is never a hang's excuse)."""
_NAMES = ("initialize", "next", "get_model_weights")


@dataclasses.dataclass
class ReferenceResult:
    model_weights: Any
    """TFF's ModelWeights of numpy arrays after the last round."""
    metrics: list[dict]
    """Each round's measurements, flattened (`name/sub: number`)."""


def _token_process(process: Any, preprocess: Any, data_format: Any = None) -> Any:
    """`process` (a `tff.learning.templates.LearningProcess`), its `next` taking
    tokens of clients whose data is in `data_format` (None: emnist-fixed)."""
    import tensorflow_federated as tff

    from coordinator.algorithm import user_process

    element = user_process.client_data_type(process)
    data = user_process.traced(preprocess, "train", data_format)
    user_process.check_fits(data.type_signature.result.element, element.element, "the process")
    return tff.simulation.compose_dataset_computation_with_learning_process(data, process)


def run(
    process: Any,
    *,
    preprocess: Any,
    shard_dirs: Sequence[Path],
    rounds: int,
    clients_per_round: int,
    seed: int = 0,
    sampling: str = "uniform",
    timeout: float = CHILD_TIMEOUT,
) -> ReferenceResult:
    """`rounds` rounds of `process` in TFF's local context over `shard_dirs`,
    sampling as a fedcompose run with the same seed does (`sampling=
    "stratified"` takes each shard's clients as one worker's)."""
    import numpy as np
    import tensorflow_federated as tff

    from coordinator.rounds.outputs import weights_from_arrays

    if rounds < 1 or clients_per_round < 1:
        raise UsageError("rounds and clients_per_round must be at least 1")
    if sampling not in SAMPLINGS:
        raise UsageError(f"sampling {sampling!r}: use one of {', '.join(SAMPLINGS)}")
    from shared import shard_format

    if not shard_dirs:
        raise UsageError("run_in_tff needs shard_dirs: the directories of the shards to read")
    # The shards' own format, as the workers serving them would report it.
    data_format = shard_format.read_manifest(Path(shard_dirs[0])).data
    composed = _token_process(process, preprocess, data_format)
    with tempfile.TemporaryDirectory(prefix="fedcompose-tff-reference-") as tmp:
        work = Path(tmp)
        for name in _NAMES:
            proto = tff.framework.serialize_computation(getattr(composed, name))
            (work / f"{name}.pb").write_bytes(proto.SerializeToString())
        spec = {
            "shard_dirs": [str(Path(p).resolve()) for p in shard_dirs],
            "rounds": rounds,
            "clients_per_round": clients_per_round,
            "seed": seed,
            "sampling": sampling,
        }
        (work / "spec.json").write_text(json.dumps(spec))
        child = subprocess.Popen(
            [sys.executable, "-m", "coordinator.tff_reference", str(work)],
            cwd=Path(__file__).resolve().parents[1],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            # It follows this process if this process dies (processes.die_with_parent).
            env={**os.environ, processes.PARENT_ENV: str(os.getpid())},
        )
        try:
            _, stderr = child.communicate(timeout=timeout)
        except BaseException:
            _kill_group(child)
            raise
        if child.returncode != 0:
            last = [line for line in stderr.strip().splitlines() if line.strip()]
            raise RuntimeError(
                f"TFF's single-process run failed (exit {child.returncode}): "
                f"{last[-1] if last else 'no output'}"
            )
        with np.load(work / "weights.npz") as saved:
            trainable, rest = weights_from_arrays({n: saved[n] for n in saved.files})
        metrics = json.loads((work / "metrics.json").read_text())
    return ReferenceResult(tff.learning.models.ModelWeights(trainable, rest), metrics)


def _kill_group(child: subprocess.Popen) -> None:
    import os
    import signal

    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()


def _child(work: Path) -> int:
    from shared import processes
    from shared.quiet import quiet_tensorflow

    processes.die_with_parent()
    quiet_tensorflow()
    import numpy as np
    import tensorflow_federated as tff
    from tensorflow_federated.proto.v0 import computation_pb2

    from coordinator import federation
    from coordinator.rounds.outputs import scalars, weight_arrays
    from deploy.bench.tff_local import LocalReference
    from shared import shard_format

    spec = json.loads((work / "spec.json").read_text())
    comps = {}
    for name in _NAMES:
        proto = computation_pb2.Computation()
        proto.ParseFromString((work / f"{name}.pb").read_bytes())
        comps[name] = tff.framework.deserialize_computation(proto)
    shard_dirs = [Path(p) for p in spec["shard_dirs"]]
    strata = [[c.id for c in shard_format.read_manifest(d).clients] for d in shard_dirs]
    client_ids = sorted(c for stratum in strata for c in stratum)
    client_shard = {c: i for i, stratum in enumerate(strata) for c in stratum}
    metrics = []
    with LocalReference(shard_dirs):
        state = comps["initialize"]()
        for round_num in range(1, spec["rounds"] + 1):
            ids = federation.sample_live(
                client_ids,
                client_shard,
                None,
                round_num,
                spec["clients_per_round"],
                spec["seed"],
                spec["sampling"],
            )
            output = _plain(
                comps["next"](state, LocalReference.tokens(ids, spec["seed"], round_num))
            )
            state = output["state"]
            metrics.append(scalars(output["metrics"]))
        weights = _plain(comps["get_model_weights"](state))
    np.savez(work / "weights.npz", **weight_arrays(weights))
    (work / "metrics.json").write_text(json.dumps(metrics))
    return 0


def _plain(value: Any) -> Any:
    """A deserialized computation's result (its Python containers are not
    serialized) as nested dicts and lists."""
    from tensorflow_federated.python.common_libs import structure

    if isinstance(value, structure.Struct):
        return structure.to_odict_or_tuple(value, recursive=True)
    return value


if __name__ == "__main__":
    sys.exit(_child(Path(sys.argv[1])))
