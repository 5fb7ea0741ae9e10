"""Every process stops with its owner: Ctrl-C, SIGTERM, SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from shared.ports import free_ports
from tests.conftest import ROOT, fedcompose, kill_tree, start_fedcompose


def _wait_for_round(run_dir, proc, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads((run_dir / "status.json").read_text()).get("completed_rounds", 0) >= 1:
                return
        except (FileNotFoundError, ValueError):
            pass
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    raise AssertionError("no round completed")


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_interrupting_a_run_stops_every_process(tmp_path, sig):
    run_dir = tmp_path / "run"
    proc = start_fedcompose(
        "run", "--rounds", "500", "--workers", "2", "--run-dir", str(run_dir), terminal=True
    )
    try:
        _wait_for_round(run_dir, proc)
        children = _descendants(proc.pid)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        assert names.count(" worker --shard") == 2 and names.count("worker_binary") >= 3
        os.kill(proc.pid, sig)  # what Ctrl-C or `kill` sends to the launcher
        _, stderr = proc.communicate(timeout=60)
    finally:
        kill_tree(proc)
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr
    assert json.loads((run_dir / "status.json").read_text())["state"] == "interrupted"
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, [c.cmdline() for c in alive]


INSTALL = """
import signal, sys
from shared import interrupts
# As a terminal starts it, or `nohup`; not as the test runner was started.
signal.signal(signal.SIGHUP, signal.SIG_IGN if sys.argv[1] == "nohup" else signal.SIG_DFL)
interrupts.install()
handler = signal.getsignal(signal.SIGHUP)
print({signal.SIG_IGN: "ignored", signal.SIG_DFL: "default"}.get(handler, "handled"))
"""


def test_sighup_stops_a_run_unless_nohup_ignores_it():
    """SIGHUP (the terminal closed) ended a run like SIGKILL, leaving status.json
    at `running`; it now stops it like Ctrl-C, except under `nohup`."""
    for how, expected in (("terminal", "handled"), ("nohup", "ignored")):
        result = subprocess.run(
            [sys.executable, "-c", INSTALL, how], cwd=ROOT, capture_output=True, text=True
        )
        assert result.stdout.strip() == expected, result.stderr


SIGNAL_DURING_IMPORT = """
import sys, time
sys.path.insert(0, sys.argv[1])
from shared import interrupts
interrupts.install()
try:
    import slow_module
    print("imported", flush=True)
    time.sleep(10)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""
SLOW_MODULE = """
import os, signal, time
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.5)
print("module done", flush=True)
"""


def test_a_signal_during_an_import_is_raised_after_it(tmp_path):
    """A SIGTERM raised as KeyboardInterrupt inside Python's import machinery
    can leave its global import lock held: `fedcompose run` SIGTERMed while
    its main thread and its TensorFlow-preloading thread both imported hung
    for good ("Exception ignored in ... _get_module_lock ... cb"), its
    workers running and its run directory locked. The interrupt now waits
    for the import to end."""
    (tmp_path / "slow_module.py").write_text(SLOW_MODULE)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", SIGNAL_DURING_IMPORT, str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.stdout.split() == ["module", "done", "imported", "interrupted"], result.stderr
    assert time.monotonic() - started < 8  # at once, not after the 10 s sleep it interrupts


def test_sigkilled_worker_takes_its_executor_with_it(workers2):
    worker = workers2[0]
    executors = [
        c for c in _descendants(worker.process.pid) if "worker_binary" in " ".join(c.cmdline())
    ]
    assert len(executors) == 1
    worker.process.kill()  # SIGKILL to the worker alone, not its process group
    worker.process.wait(timeout=10)
    _, alive = psutil.wait_procs(executors, timeout=10)
    assert not alive, "worker_binary outlived its worker"


def test_status_reports_up_and_down_workers(workers2):
    (down_port,) = free_ports(1)
    addresses = [w.address for w in workers2] + [f"localhost:{down_port}"]
    result = fedcompose(
        "status", "--addresses", ",".join(addresses), "--connect-timeout", "3", timeout=120
    )
    assert result.returncode == 4
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["ADDRESS", "STATUS", "DATASET", "SHARD"]
    up = [line for line in lines if " up " in line]
    assert len(up) == 2 and all("sklearn-digits (10)" in line and "0.87.0" in line for line in up)
    assert any(f"localhost:{down_port}" in line and "DOWN" in line for line in lines)
    assert f"connection refused: nothing listens on port {down_port}" in result.stdout
    assert "2/3 up: 60 clients, 1437 train / 360 test examples" in result.stdout


def test_a_port_taken_before_the_worker_binds_it_is_replaced(shards2, tmp_path, monkeypatch):
    """`run` picks free ports, and another program may take one before the
    worker binds it: that worker starts again on another port."""
    import socket

    from deploy import workers as workers_lib
    from shared import ports

    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    real_free_ports = ports.free_ports
    handed = []

    def first_one_taken(count, host="127.0.0.1"):
        picked = real_free_ports(count, host)
        if not handed:  # the launcher's first pick: one port is gone by the time it binds
            picked[0] = port
        handed.append(picked)
        return picked

    monkeypatch.setattr(ports, "free_ports", first_one_taken)
    try:
        started = workers_lib.start_workers(shards2, tmp_path / "logs", check="quick")
        try:
            assert started[0].port != port and started[1].port != port
            assert len(handed) == 2  # the first pick, and one new port for worker 0
            assert "serving" in started[0].log_file.read_text()
        finally:
            workers_lib.stop_workers(started)
    finally:
        taken.close()
    # A port the user chose is not swapped for another: the error says so.
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    try:
        with pytest.raises(workers_lib.LaunchError, match=f"port {blocker.getsockname()[1]}"):
            workers_lib.start_workers(
                shards2[:1], tmp_path / "logs2", base_port=blocker.getsockname()[1], check="quick"
            )
    finally:
        blocker.close()


_BACKGROUND_WORKER = """
{prefix} "$PYTHON" -m deploy.cli worker --shard "$SHARD" --port "$PORT" --shard-check quick \\
    --log-file "$LOG" >"$LOG.out" 2>&1 &
echo $! >"$PIDFILE"
tries=0
until grep -q "$READY" "$LOG" 2>/dev/null; do
    tries=$((tries + 1))
    [ "$tries" -gt 1800 ] && exit 3
    sleep 0.1
done
exit 0
"""


@pytest.mark.parametrize("prefix", ["", "nohup"])
def test_a_worker_a_user_started_outlives_the_shell_that_started_it(shards2, tmp_path, prefix):
    """`fedcompose worker ... &` in a script that then exits (as `ssh host
    'fedcompose worker ... &'` does), and the same under nohup: the worker
    asked the kernel for SIGTERM on its parent's death, so it logged `stopping
    on SIGTERM` as the shell exited; and it caught the SIGHUP nohup ignores.
    The shell waits until the worker serves, then exits; the worker must then
    stop on the signal this test sends (SIGINT), and on nothing before it."""
    (port,) = free_ports(1)
    log, pidfile = tmp_path / "worker.log", tmp_path / "worker.pid"
    script = tmp_path / "start-worker.sh"
    script.write_text(_BACKGROUND_WORKER.format(prefix=prefix))
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "SHARD": str(shards2[0]),
        "PORT": str(port),
        "LOG": str(log),
        "PIDFILE": str(pidfile),
        "READY": "ready: serving",
    }
    shell = subprocess.run(["sh", str(script)], cwd=ROOT, env=env, timeout=300)
    pid = int(pidfile.read_text())
    try:
        assert shell.returncode == 0, log.read_text() if log.exists() else "no log"
        worker = psutil.Process(pid)
        if prefix == "nohup":
            worker.send_signal(signal.SIGHUP)  # the terminal that nohup protects from
        worker.send_signal(signal.SIGINT)
        worker.wait(timeout=60)
    finally:
        with_children = [pid]
        try:
            with_children += [c.pid for c in psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
        for p in with_children:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    stops = [line for line in log.read_text().splitlines() if "stopping on" in line]
    assert len(stops) == 1 and stops[0].endswith("stopping on SIGINT"), log.read_text()[-2000:]
