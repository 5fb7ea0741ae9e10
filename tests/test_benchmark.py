"""`fedcompose bench` runs end to end on a tiny grid and writes complete results.

A smoke test of the command, not a timed test: it checks that every system
and workload produced a row with sane figures, never how fast they were.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import fedcompose

pytestmark = pytest.mark.slow


def _tiny_grid(tmp_path, *args: str, timeout: float):
    """`fedcompose bench` on 24 tiny writers, W = 1 and 2, one measured round."""
    return fedcompose(
        "bench",
        *args,
        "--workers",
        "1,2",
        "--hosted-clients",
        "24",
        "--examples-per-client",
        "6",
        "--rounds",
        "1",
        "--run-dir",
        str(tmp_path / "bench"),
        "--data-cache",
        str(tmp_path / "data"),
        timeout=timeout,
    )


def test_tiny_grid_writes_every_row_and_column(tmp_path):
    run_dir = tmp_path / "bench"
    result = _tiny_grid(tmp_path, "--quick", "--clients-per-round", "3,6", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((run_dir / "results.json").read_text())

    rows = {(r["system"], r["workers"], r["clients_per_round"]): r for r in results["rows"]}
    systems = (
        ("keras", None),
        ("tff_local", None),
        ("fedcompose", 1),
        ("fedcompose", 2),
        ("fedcompose_tls", 1),
        ("fedcompose_tls", 2),
    )
    expected = {(system, workers, clients) for clients in (3, 6) for system, workers in systems}
    assert set(rows) == expected
    for key, row in rows.items():
        assert row["error"] is None, key
        s = row["summary"]
        # One warm-up round and one measured round, on the same clients everywhere.
        assert [r["round"] for r in row["rounds"]] == [0, 1], key
        assert s["measured_rounds"] == 1
        assert s["seconds_per_round"] > 0 and s["examples_per_second"] > 0, key
        floor = rows[("keras", None, key[2])]["summary"]
        assert s["examples_per_round"] == floor["examples_per_round"], key
        assert s["ratio_vs_tff"] > 0 and s["ratio_vs_floor"] > 0, key
        # Every system's gap between round ends is reported beside its round time.
        assert s["gap_seconds"] > 0 and s["gap_per_round"] > 0, key
    for key, row in rows.items():
        if key[0] not in ("fedcompose", "fedcompose_tls"):
            assert row["summary"]["process_rss"] > 0, key
            continue
        s = row["summary"]
        if key[0] == "fedcompose_tls":
            # Measured against fedcompose without TLS on the same workload.
            assert s["tls_added"] is not None and s["tls_added_seconds"] is not None, key
        for name in ("worker_compute", "coordinator", "waiting", "overhead"):
            assert s[name] >= 0, (key, name)
        assert 0 < s["worker_compute"] <= s["seconds_per_round"]
        assert s["bytes_sent"] > 0 and s["bytes_received"] > 0
        assert s["worker_bytes_sent"] > 0 and s["server_bytes_sent"] >= 0
        # The linear model is 7,850 float32: 31,400 bytes.
        assert s["model_bytes"] == 31_400
        assert s["coordinator_rss"] > 0 and s["server_executor_rss"] > 0
        assert s["worker_rss_max"] > 0 and s["worker_executor_rss_max"] > 0
        # Its rounds were recorded as `train` records them.
        records = list(
            run_dir.rglob(f"{key[0].replace('_', '-')}-w{key[1]}/records/linear-{key[2]}")
        )
        assert len(records) == 1, (key, records)
        assert len((records[0] / "metrics.jsonl").read_text().splitlines()) == 2, key
        assert (records[0] / "checkpoints" / "round_2" / "state.npz").exists(), key
        per_worker = row["rounds"][-1]["per_worker"]
        assert len(per_worker) <= key[1]
        assert sum(w["clients"] for w in per_worker.values()) == key[2]
    assert results["meta"]["machine"]["cores"] >= 1
    assert results["targets"], "the targets are evaluated"
    # The table reaches the terminal; round time against clients is drawn.
    assert "fedcompose" in result.stdout and "Keras floor" in result.stdout
    assert (run_dir / "seconds_per_round.png").stat().st_size > 10_000
    assert "fedcompose+TLS" in result.stdout


def test_cost_curves_write_every_point_and_picture(tmp_path):
    """`--curves memory,scale` on a tiny grid: every point measured, PNGs and
    targets written; the scale curve goes through worker start-up with the
    full shard check, discovery, rounds, evaluation of every writer and a
    checkpoint at each number of hosted clients."""
    run_dir = tmp_path / "curves"
    result = fedcompose(
        "bench",
        "--curves",
        "memory,scale",
        "--model",
        "linear",
        "--clients-per-round",
        "5,40",
        "--hosted-clients",
        "60",
        "--examples-per-client",
        "6",
        "--scale-hosted",
        "300,1500",
        "--worker-memory-mb",
        "512",
        "--run-dir",
        str(run_dir),
        "--data-cache",
        str(tmp_path / "data"),
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    curves = json.loads((run_dir / "curves.json").read_text())
    memory = curves["memory"]["points"]
    assert {(p["clients_per_round"], p["worker_memory_mb"]) for p in memory} == {
        (5, 512),
        (40, 512),
        (5, 0),
        (40, 0),
        (60, 512),
        (60, 0),
    }
    assert all(p["error"] is None and p["worker_peak_mb"] > 50 for p in memory)
    # Evaluating all 60 writers: in calls that fit 512 MB, or in one without a budget.
    evaluation = {p["worker_memory_mb"]: p for p in memory if p.get("evaluation")}
    assert evaluation[512]["pieces"] >= 2 and evaluation[0]["pieces"] == 1
    scale = curves["scale"]["points"]
    assert [p["hosted_clients"] for p in scale] == [300, 1500]
    for p in scale:
        assert p["evaluated_clients"] == p["hosted_clients"]
        assert p["worker_startup_seconds"] > 0 and p["discovery_seconds"] > 0
        assert p["coordinator_mb"] > 100 and p["round_10_seconds"] > 0
    assert "round_1000_seconds" in scale[1]
    for png in ("memory.png", "scale.png"):
        assert (run_dir / png).stat().st_size > 10_000
    assert "worker memory against clients per round" in result.stdout


def test_both_paths_and_what_bounds_them_are_measured_in_one_run(tmp_path):
    """Issue 22: the fused and unfused paths, the Keras floor batched client by
    client, and the client loop (no executor) on the same examples."""
    run_dir = tmp_path / "bench"
    result = fedcompose(
        "bench",
        "--systems",
        "keras,client_loop,fedcompose,fedcompose_unfused",
        "--model",
        "linear",
        "--workers",
        "1",
        "--clients-per-round",
        "6",
        "--hosted-clients",
        "24",
        "--examples-per-client",
        "6",
        "--rounds",
        "1",
        "--run-dir",
        str(run_dir),
        "--data-cache",
        str(tmp_path / "data"),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((run_dir / "results.json").read_text())
    rows = {r["system"]: r for r in results["rows"]}
    assert set(rows) == {"keras", "client_loop", "fedcompose", "fedcompose_unfused"}
    floor = rows["keras"]["summary"]
    for system, row in rows.items():
        assert row["error"] is None, system
        assert row["summary"]["examples_per_round"] == floor["examples_per_round"], system
    # Each client's last batch is partial: never fewer batches client by client.
    assert floor["client_batches"] >= floor["batches"] > 0
    assert floor["client_batches_seconds"] > 0
    loop = rows["client_loop"]["summary"]
    assert loop["seconds_per_round"] > 0 and loop["no_shuffle_seconds"] > 0
    assert loop["input_seconds"] > 0
    (fused,) = [t for t in results["targets"] if t.get("bounds")]
    assert set(fused["bounds"]) == {
        "client_batches",
        "batch_count",
        "client_loop_no_shuffle",
        "client_loop",
        "client_input",
    }
    assert all(v > 0 for v in fused["bounds"].values()), fused
    assert "client loop" in result.stdout


def test_pinned_grid_runs_each_worker_on_its_own_core(tmp_path):
    import os

    cores = sorted(os.sched_getaffinity(0))
    assert len(cores) >= 2, "pinned mode needs two cores to put two workers on"
    run_dir = tmp_path / "bench"
    result = _tiny_grid(
        tmp_path,
        "--pinned",
        "--systems",
        "tff_local,fedcompose,fedcompose_stratified",
        "--model",
        "linear",
        "--clients-per-round",
        "4",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((run_dir / "results.json").read_text())
    seen = results["meta"]["affinity_seen"]
    # Read back from the running processes: each worker and its worker_binary on
    # its own core, TFF's local context on one core, the coordinator (main) on all.
    for index in (0, 1):
        mine = {k: v for k, v in seen.items() if k.startswith(f"fedcompose-w2/worker{index}/")}
        assert any(k.endswith("/worker_binary") for k in mine), seen
        assert all(v == [cores[index]] for v in mine.values()), seen
    # TFF's own executor runs in a worker_binary child of its process, pinned too.
    assert seen["tff_local/main/python"] == [cores[0]], seen
    assert seen["tff_local/main/worker_binary"] == [cores[0]], seen
    assert seen["fedcompose-w1/main/python"] == cores, seen
    found = {t["target"] for t in results["targets"]}
    assert "pinned: W=2 at least 1.8x as fast as W=1" in found
    assert "pinned: W=1 within 5% of TFF on one core" in found
    assert "pinned: W=2 at least 1.9x as fast as W=1 (stratified sampling)" in found
    stratified = [r for r in results["rows"] if r["system"] == "fedcompose_stratified"]
    assert sorted(r["workers"] for r in stratified) == [1, 2]
    assert all(r["error"] is None for r in stratified)
    assert "PINNED" in result.stdout


def _bench_config(*argv: str):
    import argparse

    from shared import config as config_lib

    parser = argparse.ArgumentParser()
    config_lib.add_arguments(parser, "bench")
    return config_lib.resolve(parser.parse_args(list(argv)), "bench")


def test_the_bench_builds_only_the_shards_it_reads(tmp_path):
    """`bench --curves scale` built shards of --hosted-clients writers for every
    grid worker count (912 MB at the defaults) that the scale curve, which
    builds shards of its own sizes, never read."""
    from deploy.bench import cli as bench_cli

    cache = tmp_path / "cache"
    scale = _bench_config("--curves", "scale", "--hosted-clients", "30", "--data-cache", str(cache))
    assert bench_cli._build_data(scale) == {}
    assert not cache.exists() or not any(cache.rglob("manifest*")), sorted(cache.rglob("*"))[:5]

    memory = _bench_config("--curves", "memory", "--workers", "2", "--hosted-clients", "30")
    assert bench_cli.shard_counts(memory) == [2]
    assert bench_cli.shard_counts(_bench_config("--systems", "keras,tff_local")) == [1]
    assert bench_cli.shard_counts(_bench_config("--systems", "fedcompose", "--workers", "2,4")) == [
        2,
        4,
    ]
    assert bench_cli.shard_counts(_bench_config()) == [1, 2, 4]
