"""`fedcompose run` restarts crashed local workers (a bounded number of times),
and `fedcompose status` shows the run's own view of each worker."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import sys
import time

import psutil
import pytest

from deploy import workers as workers_lib
from shared import worker_dir
from shared.pause_points import ENV_POINT as PAUSE_ENV
from tests.conftest import ROOT, fedcompose, kill_tree, start_fedcompose
from tests.test_worker_failures import _paused, _rows, _wait_admissible


def _worker_binary_on(run_proc, address: str) -> psutil.Process:
    """The executor service of the local worker serving `address`."""
    port = address.rsplit(":", 1)[1]
    for child in psutil.Process(run_proc.pid).children():
        cmdline = child.cmdline()
        if "worker" in cmdline and cmdline[cmdline.index("--port") + 1] == port:
            return next(c for c in child.children() if "worker_binary" in " ".join(c.cmdline()))
    raise AssertionError(f"no local worker on {address}")


@pytest.mark.slow
def test_run_restarts_a_crashed_worker_a_bounded_number_of_times(tmp_path):
    run_dir = tmp_path / "run"
    kill, look, back, again = (tmp_path / name for name in ("kill", "look", "back", "again"))
    env = dict(os.environ)
    env[PAUSE_ENV] = f"dispatch:4={kill};dispatch:6={look};dispatch:12={back};dispatch:16={again}"
    proc = start_fedcompose(
        "run", "--workers", "3", "--rounds", "25", "--eval-every", "0",
        "--worker-restarts", "1", "--restart-backoff", "2", "--run-dir", str(run_dir), env=env,
    )  # fmt: skip
    try:
        address = _paused(kill, proc)["workers"][0]
        index = int(re.search(r"worker (\d+) ready on " + re.escape(address),
                              (run_dir / "logs/launcher.log").read_text()).group(1))  # fmt: skip
        _worker_binary_on(proc, address).kill()
        kill.unlink()

        _paused(look, proc)  # it was lost in round 4; the launcher waits 2 s to restart it
        # status.json follows the rounds within about a second (docs/run-records.md).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                if json.loads((run_dir / "status.json").read_text())["completed_rounds"] >= 5:
                    break
            time.sleep(0.1)
        status = fedcompose("status", "--run-dir", str(run_dir), "--connect-timeout", "3")
        line = next(line for line in status.stdout.splitlines() if line.startswith(address))
        # Down, or already restarted and answering (the launcher waits only 2 s).
        assert line.split()[2] in ("down", "rejoining"), status.stdout
        assert "run " + str(run_dir) + ": running, 5 of 25 rounds done" in status.stdout
        look.unlink()

        _paused(back, proc)
        _wait_admissible(run_dir, index)  # "up": it rejoined before round 12
        back.unlink()

        _paused(again, proc)
        _worker_binary_on(proc, address).kill()  # its one restart is used up
        again.unlink()
        _, stderr = proc.communicate(timeout=300)
    finally:
        kill_tree(proc)
    assert proc.returncode == 0, stderr[-3000:]
    # The launcher logs to the terminal and, once the coordinator runs, to its log.
    for log in (stderr, (run_dir / "logs/coordinator.log").read_text()):
        assert f"worker {index} ({address}) exited with code" in log
        assert "restarting it in 2.0s (restart 1 of 1)" in log
        assert f"worker {index} serves again on {address} (restart 1" in log
        assert "restarted 1 times already (--worker-restarts); not restarting it" in log
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == list(range(1, 26))
    assert index not in rows[5]["live_workers"]
    assert all(r["live_workers"] == [0, 1, 2] for r in rows[12:15])
    assert all(index not in r["live_workers"] for r in rows[17:])


@pytest.mark.slow
def test_status_shows_the_runs_view_of_each_worker(workers2, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    now = time.time()
    states = (("up", ""), ("rejoining", "answered; joins at the next round"))
    view = [
        {"index": i, "address": w.address, "state": state, "since": now - 5, "reason": why,
         "outages": 1, "rejoins": 0}
        for i, (w, (state, why)) in enumerate(zip(workers2, states, strict=True))
    ]  # fmt: skip
    (run_dir / "workers.json").write_text(json.dumps({"updated_at": now, "workers": view}))
    (run_dir / "status.json").write_text(
        json.dumps({"state": "running", "completed_rounds": 7, "target_rounds": 30})
    )
    # A coordinator runs there: it holds the run directory's lock.
    lock = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    result = fedcompose("status", "--run-dir", str(run_dir), timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["ADDRESS", "STATUS", "RUN", "DATASET"]
    assert lines[1].split()[:3] == [workers2[0].address, "up", "up"]
    assert lines[2].split()[:3] == [workers2[1].address, "up", "rejoining"]
    assert re.fullmatch(r"\d+s", lines[2].split()[3]) and int(lines[2].split()[3][:-1]) >= 5
    assert f"the run sees {workers2[1].address} rejoining: answered" in result.stdout
    assert f"run {run_dir}: running, 7 of 30 rounds done" in result.stdout

    as_json = fedcompose("status", "--run-dir", str(run_dir), "--json", timeout=120)
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [r["run_view"]["state"] for r in rows[:2]] == ["up", "rejoining"]
    assert rows[2]["run"]["completed_rounds"] == 7
    assert rows[2]["run"]["coordinator_running"] is True

    # Killed, it leaves "running" behind; status says no coordinator runs there.
    os.close(lock)
    dead = fedcompose("status", "--run-dir", str(run_dir), timeout=120)
    assert f"run {run_dir}: not running (it says running, but no coordinator holds" in dead.stdout
    assert "7 of 30 rounds done" in dead.stdout and "from before it stopped" in dead.stdout

    missing = fedcompose("status", "--run-dir", str(tmp_path / "nowhere"), timeout=60)
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        f"fedcompose status: error: --run-dir {tmp_path / 'nowhere'} does not exist"
    )
    neither = fedcompose("status", timeout=60)
    assert neither.returncode == 2 and "give --addresses, or --run-dir" in neither.stderr


def _exited_worker(index: int, tmp_path, restart_script: str) -> workers_lib.LocalWorker:
    """A local worker whose process has exited; a restart runs `restart_script`."""
    process, output = workers_lib._spawn([sys.executable, "-c", "raise SystemExit(3)"])
    process.wait(timeout=30)
    args = [sys.executable, "-c", restart_script]
    return workers_lib.LocalWorker(
        index, tmp_path, 0, tmp_path / f"w{index}.log", process, output, args
    )


def test_one_workers_slow_restart_does_not_hold_up_anothers(tmp_path):
    # Worker 0 comes back but never says it serves; worker 1 is ready at once.
    # A single supervising thread held worker 1 for worker 0's whole ready
    # timeout (30 + 15 s here).
    hang = "import time; time.sleep(120)"
    # Like `fedcompose worker`, it dies with the thread that started it.
    ready = (
        f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); "
        "from shared.processes import die_with_parent; die_with_parent(); "
        f"print({worker_dir.READY_MARK!r}, flush=True); time.sleep(120)"
    )
    workers = [_exited_worker(0, tmp_path, hang), _exited_worker(1, tmp_path, ready)]
    supervisor = workers_lib.Supervisor(
        workers, max_restarts=1, backoff=0.0, ready_timeout=30.0
    ).start()
    try:
        # Not `wait_serving`: until the restart, the process it sees is the exited one.
        deadline = time.monotonic() + 15.0
        while not workers[1].output.ready.is_set():
            assert time.monotonic() < deadline, "worker 1 was not restarted in time"
            time.sleep(0.05)
        assert workers[0].restarts == 1 and not workers[0].output.ready.is_set()
        # Its supervising thread lives on, so the kernel does not stop it.
        time.sleep(1.0)
        assert workers[1].process.poll() is None
    finally:
        supervisor.stop()
        for w in workers:
            w.process.kill()
            w.process.wait(timeout=30)


def test_a_crash_is_reported_with_its_own_reason_not_an_old_log_line(shards2, tmp_path, caplog):
    # The executor log is appended to across restarts: a line an earlier
    # process wrote (here at start-up) was quoted as the reason of every later
    # exit; and a worker killed outright was given its own ready line as reason.
    logs = tmp_path / "logs"
    logs.mkdir()
    old = "E1203 00:00:00.000000 1 old.cc:1] an earlier start: check for SO_REUSEPORT"
    (logs / "worker-0.executor.log").write_text(old + "\n")
    workers = workers_lib.start_workers(shards2, logs, check="quick")
    # No restart: the supervisor only says why each exited.
    supervisor = workers_lib.Supervisor(workers, max_restarts=0, backoff=0.0, ready_timeout=30.0)
    try:
        with caplog.at_level(logging.ERROR, logger="fedcompose.launcher"):
            supervisor.start()
            binary = next(
                c
                for c in psutil.Process(workers[0].process.pid).children()
                if "worker_binary" in " ".join(c.cmdline())
            )
            binary.kill()  # the executor alone: the worker says why and exits
            workers[1].process.kill()  # the worker itself: nothing said
            deadline = time.monotonic() + 60
            while len([r for r in caplog.records if "not restarting it" in r.getMessage()]) < 2:
                assert time.monotonic() < deadline, caplog.text
                time.sleep(0.1)
    finally:
        supervisor.stop()
        workers_lib.stop_workers(workers)
    said = {r.getMessage().split(")", 1)[0]: r.getMessage() for r in caplog.records}
    first = said[f"worker 0 ({workers[0].address}"]
    assert (
        "exited with code 1: TFF's executor service exited unexpectedly with code -9 "
        "(killed by SIGKILL); it wrote nothing since it started serving; it was restarted"
    ) in first, first
    second = said[f"worker 1 ({workers[1].address}"]
    assert "exited with code -9 (killed by SIGKILL); it was restarted 0 times" in second, second
