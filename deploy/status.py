"""`fedcompose status`: is each worker up, and what does it host?

Runs only the tiny describe computation on each worker (no training), in
parallel, each within the connect deadline. With `--run-dir`, it also shows
the running coordinator's own view of each worker (up, down, rejoining,
refused: the run directory's `workers.json`, which the coordinator keeps
current), and takes the addresses from there when none are given.
"""

from __future__ import annotations

import json
import time
from concurrent import futures
from pathlib import Path

from coordinator.liveness import WORKERS_VIEW
from shared import config
from shared.errors import FederationError, RunDirError, UsageError

DESCRIPTION = (
    "Show, for each worker address, whether it is up, what shard it serves (dataset, "
    "clients, examples) and its TFF version, without running any training; for a worker "
    "that is down, why (refused, no answer, not a TFF executor service, or the TLS "
    "problem). With --run-dir, also the run's own view of each worker (up, down, "
    "rejoining, refused) and its progress; the addresses then default to the run's. "
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


def _read_json(path: Path) -> dict | None:
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RunDirError(
            f"{path} cannot be read ({e}); is it a fedcompose run directory?"
        ) from None
    return body if isinstance(body, dict) else None


def _coordinator_running(run_dir: Path) -> bool | None:
    """Whether a process holds the run directory's lock, that is, a coordinator
    runs there now; None where the kernel does not say (no /proc/locks).

    Read from the kernel's list of locks, not by trying the lock: holding it
    even for a moment could refuse a coordinator starting at that moment.
    """
    from coordinator.run_dir import LOCK_NAME

    try:
        locks = Path("/proc/locks").read_text()
    except OSError:
        return None
    try:
        st = (run_dir / LOCK_NAME).stat()
    except FileNotFoundError:
        return False
    except OSError:
        return None
    # Lines read "1: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE 0 EOF". Only the
    # inode is compared: some file systems (btrfs) report another device
    # there than stat does, and a wrong "running" only says what status.json says.
    inode = str(st.st_ino)
    return any(
        len(fields) > 5 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == inode
        for fields in (line.split() for line in locks.splitlines())
    )


_VIEW_FIELDS = ("state", "since", "reason", "outages", "rejoins")


def _worker_views(view: dict | None) -> dict[str, dict]:
    """The coordinator's view of each worker, by address. Entries of another
    shape (a damaged or foreign file) are left out; fields missing are None."""
    entries = (view or {}).get("workers")
    if not isinstance(entries, list):
        return {}
    workers = {}
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("address"), str):
            one = {k: entry.get(k) for k in _VIEW_FIELDS}
            one["state"] = str(one["state"] or "unknown")
            workers[entry["address"]] = one
    return workers


def _run_view(run_dir: Path) -> tuple[dict, dict[str, dict]]:
    """The run's status and its coordinator's view of each worker, by address."""
    if not run_dir.is_dir():
        what = "is not a directory" if run_dir.exists() else "does not exist"
        raise UsageError(f"--run-dir {run_dir} {what}")
    status = _read_json(run_dir / "status.json") or {}
    view = _read_json(run_dir / WORKERS_VIEW)
    if not status and view is None:
        raise UsageError(f"--run-dir {run_dir} holds no run (no status.json, no {WORKERS_VIEW})")
    workers = _worker_views(view)
    if view is not None:
        status = {**status, "view_updated_at": view.get("updated_at")}
    if status.get("state") == "running":
        # A coordinator SIGKILLed (or its machine lost) leaves "running" behind.
        status["coordinator_running"] = _coordinator_running(run_dir)
    return status, workers


def run(settings: config.RunConfig) -> int:
    addresses = list(settings.federation.addresses)
    run_status: dict | None = None
    views: dict[str, dict] = {}
    if settings.output.run_dir:
        run_status, views = _run_view(Path(settings.output.run_dir))
        addresses = addresses or list(views)
    if not addresses:
        raise UsageError(
            "give --addresses, or --run-dir of a run whose coordinator recorded its workers"
        )
    # TensorFlow loads only now: refusals that need only the run directory come first.
    from coordinator.executor_client.connection import load_client_tls

    timeout = settings.federation.connect_timeout
    tls = load_client_tls(settings.tls.tls_dir)
    with futures.ThreadPoolExecutor(len(addresses)) as pool:
        rows = list(pool.map(lambda a: _probe(a, timeout, tls), addresses))
    if run_status is not None:
        for row in rows:
            view = views.get(row["address"])
            row["run_view"] = view
    if settings.output.json:
        for row in rows:
            print(json.dumps(row))
        if run_status is not None:
            print(json.dumps({"run": _run_summary(settings.output.run_dir, run_status)}))
    else:
        _print_table(rows)
        if run_status is not None:
            print(_run_line(settings.output.run_dir, run_status))
    return 0 if all(r["up"] for r in rows) else FederationError.exit_code


def _run_summary(run_dir: str, status: dict) -> dict:
    return {
        "run_dir": run_dir,
        "state": status.get("state", "unknown"),
        "completed_rounds": status.get("completed_rounds"),
        "target_rounds": status.get("target_rounds"),
        "view_updated_at": status.get("view_updated_at"),
        **(
            {"coordinator_running": status["coordinator_running"]}
            if "coordinator_running" in status
            else {}
        ),
        **({"waiting": waiting} if (waiting := _waiting(status)) else {}),
    }


def _waiting(status: dict) -> dict | None:
    """What the running coordinator waits for (an outage), if it says so whole."""
    waiting = status.get("waiting")
    if (
        status.get("state") != "running"
        or status.get("coordinator_running") is False
        or not isinstance(waiting, dict)
        or not isinstance(waiting.get("what"), str)
    ):
        return None
    return waiting


def _run_line(run_dir: str, status: dict) -> str:
    s = _run_summary(run_dir, status)
    state = s["state"]
    if s.get("coordinator_running") is False:
        state = (
            "not running (it says running, but no coordinator holds the run directory: it "
            "was killed or its machine went down; run the same command to resume)"
        )
    line = f"run {run_dir}: {state}"
    if s["completed_rounds"] is not None:
        line += f", {s['completed_rounds']} of {s['target_rounds']} rounds done"
    waiting = s.get("waiting")
    if waiting:
        line += f"; waiting {_age(waiting.get('since'))} for workers to return ({waiting['what']}"
        gives_up = waiting.get("gives_up_at")
        if isinstance(gives_up, int | float) and not isinstance(gives_up, bool):
            line += f"; gives up in {_span(gives_up - time.time())}"
        line += ")"
    if s["view_updated_at"]:
        line += f"; its view of the workers is {_age(s['view_updated_at'])} old"
        if s.get("coordinator_running") is False:
            line += ", from before it stopped"
    return line


def _age(at: object) -> str:
    if not isinstance(at, int | float) or isinstance(at, bool):
        return "?"
    return _span(time.time() - at)


def _span(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds}s" if seconds < 120 else f"{seconds // 60}m"


def _view_cell(row: dict) -> str:
    view = row.get("run_view")
    if view is None:
        return "-" if "run_view" in row else ""
    cell = view["state"]
    if view["state"] != "up":
        cell += f" {_age(view['since'])}"
    return cell


def _print_table(rows: list[dict]) -> None:
    with_view = any("run_view" in r for r in rows)
    header = (
        "ADDRESS",
        "STATUS",
        *(("RUN",) if with_view else ()),
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
                    *((_view_cell(r),) if with_view else ()),
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
            cells = (r["address"], "DOWN", *((_view_cell(r),) if with_view else ()))
            table.append(cells + ("",) * (len(header) - len(cells)))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    for r in rows:
        if not r["up"]:
            print(f"  {r['error']}")
        view = r.get("run_view")
        if view and view["state"] != "up" and view.get("reason"):
            print(f"  the run sees {r['address']} {view['state']}: {view['reason']}")
    up = [r for r in rows if r["up"]]
    if up:
        train = sum(r["train_examples"] for r in up)
        test = sum(r["test_examples"] for r in up)
        clients = sum(r["clients"] for r in up)
        print(f"{len(up)}/{len(rows)} up: {clients} clients, {train} train / {test} test examples")
