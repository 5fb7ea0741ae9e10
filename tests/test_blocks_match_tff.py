"""Every block, run over real worker processes, equals stock TFF in one process.

Each test runs several algorithms, 3 rounds each, over two real worker
processes (`tests/distributed_run.py`: the coordinator's own session and round
executor, one process for all of them) and the same rounds in TFF's local
context (`tests/stock_reference.py`), where a block TFF ships as a builder
or preset runs as TFF builds it: `build_weighted_fed_avg` with the server
optimizer (FedAdam, FedYogi, ...), with the client optimizer,
`build_weighted_fed_prox`, `build_unweighted_fed_avg`,
`tff.learning.robust_aggregator`, `tff.learning.dp_aggregator`. Blocks TFF has
no builder for (compression, fixed-norm robust aggregation, DP with fixed
clipping) are checked against fedcompose's own composition in the local
context. The final weights must agree within 1e-5.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

ROUNDS = 3
CLIENTS = 24  # of 60 writers over 2 workers: workers get uneven counts, some padded
SEED = 0
MODEL_DELTA = {"client_work": "model_delta"}
ROBUST_FIXED_NORMS = {"aggregator": "robust", "zeroing_norm": 0.05, "clipping_norm": 0.3}
"""Fixed norms at which both zeroing and clipping act on some of the clients."""
QUANTIZED = {
    "quantization_threshold": 1000,
    "quantization_rounding": "deterministic",
    "quantization_bits": 4,
}
QUANTIZED_ROUNDS = 1
"""Quantized runs are compared after their first round only. Both sides start
it from the same bits (the same initial model, the same client data and
graphs), so every client's update, and every value it rounds, is the same
bit for bit. From round 2 on, the models differ in their last bits (the
workers' partial sums and TFF's one sum add in other orders), and rounding
hundreds of thousands of values to 4 bits turns any of them that lies within
those bits of a rounding boundary into a whole quantization step: 8.2e-05 on
one machine, nothing on another. The comparison of later rounds is then not
a property of the code but of the float noise of the machine it runs on.
Aggregators that decide per client (zeroing or clipping a client's norm at a
threshold) keep their 3 rounds: 24 decisions a round, each as likely to fall
within 1e-8 of its threshold as a norm is to, about one in a million."""


def _run(name: str, blocks: dict | None = None, stock: dict | None = None, **spec) -> dict:
    return {
        "name": name,
        "spec": {"clients_per_round": CLIENTS, **spec, "blocks": blocks or {}},
        "rounds": ROUNDS,
        "clients_per_round": CLIENTS,
        "seed": SEED,
        "stock": stock,
    }


def _quantized(run: dict) -> dict:
    return {**run, "rounds": QUANTIZED_ROUNDS}


def _start(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / script), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> None:
    try:
        _, stderr = proc.communicate(timeout=1200)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-4000:]


def _start_distributed(workers, runs: list[dict], out: Path) -> subprocess.Popen:
    addresses = ",".join(w.address for w in workers)
    return _start("distributed_run.py", addresses, json.dumps(runs), str(out))


def _start_reference(shards, runs: list[dict], out: Path) -> subprocess.Popen:
    return _start("stock_reference.py", json.dumps(runs), str(out), *map(str, shards))


def distributed(
    workers, runs: list[dict], tmp_path: Path, tag: str, processes: int = 1
) -> tuple[dict, dict]:
    """The runs over the workers, split among `processes` coordinators at once
    (runs of one algorithm stay together, so each composes it once)."""
    by_spec: dict[str, list[dict]] = {}
    for run in runs:
        by_spec.setdefault(json.dumps(run["spec"], sort_keys=True), []).append(run)
    groups: list[list[dict]] = [[] for _ in range(processes)]
    for i, same in enumerate(by_spec.values()):
        groups[i % processes].extend(same)
    outs = [tmp_path / f"{tag}-distributed-{i}.npz" for i in range(processes)]
    procs = [_start_distributed(workers, g, out) for g, out in zip(groups, outs, strict=True) if g]
    try:
        for proc in procs:
            _finish(proc)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    arrays, report = {}, {}
    for group, out in zip(groups, outs, strict=True):
        if group:
            arrays.update(np.load(out))
            report.update(json.loads(out.with_suffix(".json").read_text()))
    return arrays, report


def reference(shards, runs: list[dict], tmp_path: Path, tag: str) -> dict:
    out = tmp_path / f"{tag}-reference.npz"
    _finish(_start_reference(shards, runs, out))
    return dict(np.load(out))


def distributed_and_reference(
    workers, shards, runs: list[dict], tmp_path: Path, tag: str
) -> tuple[dict, dict]:
    """Both sides at once (each is mostly one busy core: tracing and compiling)."""
    dist_out, ref_out = tmp_path / f"{tag}-distributed.npz", tmp_path / f"{tag}-reference.npz"
    procs = [_start_distributed(workers, runs, dist_out), _start_reference(shards, runs, ref_out)]
    try:
        for proc in procs:
            _finish(proc)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return dict(np.load(dist_out)), dict(np.load(ref_out))


def assert_match(runs, dist, ref, atol=1e-5) -> None:
    failures = []
    for run in runs:
        for i in (0, 1):
            key = f"{run['name']}__trainable_{i}"
            diff = float(np.abs(dist[key] - ref[key]).max())
            print(f"{run['name']} weights {i}: max |distributed - reference| {diff:.2e}")
            if not diff <= atol:
                failures.append(f"{run['name']} weights {i}: max |diff| {diff:.3g}")
    assert not failures, failures


def test_client_work_and_finalizers_equal_stock_tff_builders(workers2, shards2, tmp_path):
    runs = [
        # FedAvg as TFF builds it: unclipped model-delta client work, server SGD.
        _run("fedavg", MODEL_DELTA, {"builder": "fed_avg"}),
        # Finalizers: FedAdam, FedYogi, FedAdagrad (Reddi et al.) and server momentum.
        _run(
            "fedadam",
            {**MODEL_DELTA, "server_optimizer": "adam"},
            {"builder": "fed_avg"},
            server_learning_rate=0.05,
        ),
        _run(
            "fedyogi",
            {**MODEL_DELTA, "server_optimizer": "yogi"},
            {"builder": "fed_avg"},
            server_learning_rate=0.05,
        ),
        _run(
            "fedadagrad",
            {**MODEL_DELTA, "server_optimizer": "adagrad"},
            {"builder": "fed_avg"},
            server_learning_rate=0.05,
        ),
        _run(
            "server_sgdm",
            {**MODEL_DELTA, "server_optimizer": "sgdm"},
            {"builder": "fed_avg"},
            server_learning_rate=0.5,
        ),
        # Client optimizers and local epochs.
        _run(
            "client_adam_2_epochs",
            {**MODEL_DELTA, "client_optimizer": "adam"},
            {"builder": "fed_avg"},
            client_learning_rate=0.01,
            local_epochs=2,
        ),
        _run(
            "client_sgdm",
            {**MODEL_DELTA, "client_optimizer": "sgdm"},
            {"builder": "fed_avg"},
            client_learning_rate=0.05,
        ),
        # FedProx. TFF 0.87's proximal term has the opposite sign of the paper's
        # (see coordinator/algorithm/client_work.py); fedcompose's client work with
        # mu = -0.5 is TFF's with proximal_strength 0.5, term for term.
        _run(
            "fedprox_tff_sign",
            {**MODEL_DELTA, "proximal_mu": -0.5},
            {"builder": "fed_prox", "proximal_strength": 0.5},
        ),
    ]
    dist, ref = distributed_and_reference(workers2, shards2, runs, tmp_path, "client-finalizer")
    assert_match(runs, dist, ref)
    # The runs differ from each other, so each comparison tests its block.
    assert np.abs(dist["fedadam__trainable_0"] - dist["fedavg__trainable_0"]).max() > 1e-3
    assert np.abs(dist["fedprox_tff_sign__trainable_0"] - dist["fedavg__trainable_0"]).max() > 1e-3


def test_aggregators_equal_tff_presets_or_the_same_composition_locally(workers2, shards2, tmp_path):
    runs = [
        _run(
            "robust",
            {**MODEL_DELTA, "aggregator": "robust"},
            {"builder": "fed_avg", "aggregator": "robust"},
        ),
        _run(
            "unweighted_mean",
            {**MODEL_DELTA, "weighting": "uniform"},
            {"builder": "unweighted_fed_avg"},
        ),
        _run(
            "dp_adaptive_no_noise",
            {**MODEL_DELTA, "aggregator": "dp_adaptive", "noise_multiplier": 0.0},
            {"builder": "unweighted_fed_avg", "aggregator": "dp_adaptive"},
        ),
        # No stock builder: fedcompose's composition, in TFF's local context.
        # TFF's adaptive zeroing never fires in these 3 rounds (its norm stays
        # near 20); a fixed norm of 0.05 zeroes 5 of round 1's 24 clients and 1
        # of round 3's, so zeroing is tested here (against the run without it).
        _run("robust_fixed_norms", ROBUST_FIXED_NORMS),
        _run("robust_no_zeroing", {**ROBUST_FIXED_NORMS, "zeroing": False}),
        _quantized(_run("compression", {"aggregator": "compression", **QUANTIZED})),
        # The same as robust_fixed_norms but for the quantized sum, and the
        # same without quantizing (both one round).
        _quantized(
            _run(
                "compression_fixed_norms",
                {**ROBUST_FIXED_NORMS, "aggregator": "compression", **QUANTIZED},
            )
        ),
        _quantized(_run("robust_fixed_norms_1_round", ROBUST_FIXED_NORMS)),
        _run(
            "dp_fixed_no_noise",
            {"aggregator": "dp_fixed", "noise_multiplier": 0.0, "dp_clip_norm": 0.5},
        ),
    ]
    dist, ref = distributed_and_reference(workers2, shards2, runs, tmp_path, "aggregators")
    assert_match(runs, dist, ref)
    # Quantizing to 4 bits changed the result (all else equal), so the
    # compression runs test it; so did zeroing, so the fixed-norm run tests that.
    unquantized = dist["robust_fixed_norms_1_round__trainable_0"]
    assert np.abs(dist["compression_fixed_norms__trainable_0"] - unquantized).max() > 1e-4
    plain = dist["robust_fixed_norms__trainable_0"]
    assert np.abs(dist["robust_no_zeroing__trainable_0"] - plain).max() > 1e-6


# Every aggregator offered, as `--aggregator` and its parameters give it.
AGGREGATORS = {
    "mean": {},
    "mean_uniform": {"weighting": "uniform"},
    "robust": {"aggregator": "robust"},
    "robust_fixed_norms": ROBUST_FIXED_NORMS,
    "robust_uniform": {"aggregator": "robust", "weighting": "uniform"},
    "compression": {
        "aggregator": "compression",
        "quantization_threshold": 1000,
        "quantization_rounding": "deterministic",
    },
    "dp_fixed": {"aggregator": "dp_fixed", "noise_multiplier": 0.0},
    "dp_adaptive": {"aggregator": "dp_adaptive", "noise_multiplier": 0.0},
}
PADDED = {"mean", "robust_fixed_norms"}
"""The aggregators whose every aggregate is example-weighted: the only ones padded."""


def test_padding_changes_no_result_for_any_aggregator(workers2, tmp_path):
    from coordinator.algorithm import AlgorithmSpec, aggregator
    from shared.config import AGGREGATORS as OFFERED
    from shared.config import REFUSED_AGGREGATORS

    # Every aggregator offered (but the refused) is covered here.
    covered = {blocks.get("aggregator", "mean") for blocks in AGGREGATORS.values()}
    assert covered == set(OFFERED) - set(REFUSED_AGGREGATORS)
    for name, blocks in AGGREGATORS.items():
        harmless = aggregator.empty_clients_harmless(AlgorithmSpec.from_dict({"blocks": blocks}))
        assert harmless == (name in PADDED), name

    # Padding is the unfused path's: a fused share runs at one client count,
    # never padded (tests/test_fused.py).
    runs = []
    for name, blocks in AGGREGATORS.items():
        for pad in ("auto", "off"):
            run = _run(f"{name}_{pad}", blocks)
            run["pad"] = pad
            run["fused"] = False
            runs.append(run)
    # A control: padding an unweighted mean anyway changes its result.
    control = _run("mean_uniform_forced", AGGREGATORS["mean_uniform"])
    control["pad"] = "forced"
    control["fused"] = False
    runs.append(control)
    dist, report = distributed(workers2, runs, tmp_path, "padding", processes=2)

    for name in AGGREGATORS:
        assert report[f"{name}_off"]["padded_clients"] == 0
        padded = report[f"{name}_auto"]["padded_clients"]
        assert (padded > 0) == (name in PADDED), (name, padded)
        for i in (0, 1):
            a, b = dist[f"{name}_auto__trainable_{i}"], dist[f"{name}_off__trainable_{i}"]
            assert np.abs(a - b).max() <= 1e-6, (name, float(np.abs(a - b).max()))
    assert report["mean_uniform_forced"]["padded_clients"] > 0
    forced = dist["mean_uniform_forced__trainable_0"]
    assert np.abs(forced - dist["mean_uniform_off__trainable_0"]).max() > 1e-4


def test_dp_noise_has_the_configured_scale(workers2, tmp_path):
    """One round from the same model on the same clients, with and without noise:
    the difference is the noise on the mean update, of stddev z * clip / clients
    (dp_adaptive: TFF's value noise multiplier for a total z, at the initial clip)."""
    from tensorflow_federated.python.aggregators.differential_privacy import (
        adaptive_clip_noise_params,
    )

    clients, z, clip = 24, 2.0, 0.5
    cases = {
        "dp_fixed": ({"aggregator": "dp_fixed", "dp_clip_norm": clip}, z),
        "dp_adaptive": (
            {"aggregator": "dp_adaptive", "dp_clip_norm": clip},
            adaptive_clip_noise_params(z, clients)[0],
        ),
    }
    runs = []
    for name, (blocks, _) in cases.items():
        for noise in (z, 0.0):
            run = _run(f"{name}_{noise}", {**blocks, "zeroing": False, "noise_multiplier": noise})
            run["rounds"] = 1
            runs.append(run)
    dist, _ = distributed(workers2, runs, tmp_path, "noise", processes=2)
    for name, (_, value_noise_multiplier) in cases.items():
        noise = np.concatenate(
            [
                (dist[f"{name}_{z}__trainable_{i}"] - dist[f"{name}_0.0__trainable_{i}"]).ravel()
                for i in (0, 1)
            ]
        )
        expected = value_noise_multiplier * clip / clients
        # 7,850 independent draws: the sample stddev is within 3% of the truth
        # with overwhelming probability (its relative standard error is 0.8%).
        assert abs(noise.std() / expected - 1) < 0.03, (name, noise.std(), expected)
        assert abs(noise.mean()) < 4 * expected / np.sqrt(noise.size), (name, noise.mean())
