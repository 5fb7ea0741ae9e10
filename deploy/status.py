"""`fedcompose status`: is each worker up, and what does it host?

Runs only the tiny describe computation on each worker (no training), in
parallel, each within the connect deadline.
"""

from __future__ import annotations

import json
import time
from concurrent import futures

from shared import config
from shared.errors import FederationError

DESCRIPTION = (
    "Show, for each worker address, whether it is up, what shard it serves (dataset, "
    "clients, examples) and its TFF version, without running any training; for a worker "
    "that is down, why (refused, no answer, not a TFF executor service, or the TLS "
    "problem). "
    "Exits 4 if any worker is down."
)


def _probe(address: str, timeout: float, tls=None) -> dict:
    from coordinator import federation
    from coordinator.executor_client import RemoteWorker

    started = time.perf_counter()
    worker = RemoteWorker(address, rpc_timeout=timeout, connect_timeout=timeout, tls=tls)
    try:
        # A refused connection is an answer: nothing listens there now.
        worker.wait_ready(retry_refused=False)
        description = federation.describe_worker(worker)
    except FederationError as e:
        return {"address": address, "up": False, "error": str(e)}
    finally:
        worker.close()
    m = description.manifest
    info = description.info
    return {
        "address": address,
        "up": True,
        "dataset": m.task.dataset,
        "num_classes": m.task.num_classes,
        "shard": f"{m.shard_index + 1}/{m.num_shards}",
        "build": m.build_id,
        "clients": len(m.clients),
        "train_examples": m.train_examples,
        "test_examples": m.test_examples,
        "tff_version": info.tff_version,
        "tls": info.tls,
        "host": info.host,
        "uptime_s": round(time.time() - info.started_at) if info.started_at else None,
        "latency_ms": round((time.perf_counter() - started) * 1000),
    }


def run(settings: config.RunConfig) -> int:
    from coordinator.executor_client.connection import load_client_tls

    addresses = settings.federation.addresses
    timeout = settings.federation.connect_timeout
    tls = load_client_tls(settings.tls.tls_dir)
    with futures.ThreadPoolExecutor(len(addresses)) as pool:
        rows = list(pool.map(lambda a: _probe(a, timeout, tls), addresses))
    if settings.output.json:
        for row in rows:
            print(json.dumps(row))
    else:
        _print_table(rows)
    return 0 if all(r["up"] for r in rows) else FederationError.exit_code


def _print_table(rows: list[dict]) -> None:
    header = (
        "ADDRESS",
        "STATUS",
        "DATASET",
        "SHARD",
        "CLIENTS",
        "TRAIN",
        "TEST",
        "TFF",
        "HOST",
        "UPTIME",
    )
    table = [header]
    for r in rows:
        if r["up"]:
            table.append(
                (
                    r["address"],
                    "up",
                    f"{r['dataset']} ({r['num_classes']})",
                    r["shard"],
                    str(r["clients"]),
                    str(r["train_examples"]),
                    str(r["test_examples"]),
                    r["tff_version"],
                    r["host"],
                    f"{r['uptime_s']}s" if r["uptime_s"] is not None else "?",
                )
            )
        else:
            table.append((r["address"], "DOWN", "", "", "", "", "", "", "", ""))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    for r in rows:
        if not r["up"]:
            print(f"  {r['error']}")
    up = [r for r in rows if r["up"]]
    if up:
        train = sum(r["train_examples"] for r in up)
        test = sum(r["test_examples"] for r in up)
        clients = sum(r["clients"] for r in up)
        print(f"{len(up)}/{len(rows)} up: {clients} clients, {train} train / {test} test examples")
