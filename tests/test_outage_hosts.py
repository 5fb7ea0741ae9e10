"""An outage of every worker, on other network hosts: a partition that lasts
longer than the round deadline and every retry together is waited out, and
the run says meanwhile that it waits, and for what."""

from __future__ import annotations

import json
import os
import re
import time

import pytest

from deploy import workers as workers_lib
from shared.pause_points import ENV_POINT as PAUSE_ENV
from tests import netns
from tests.conftest import fedcompose, kill_tree, start_fedcompose
from tests.test_worker_failures import _paused, _rows

PARTITION = 25.0
"""Seconds every worker is cut off: longer than the run survived before
(--round-timeout 3 + 3 retries x --retry-wait 5 = 18 s), as short as shows it."""


def _waiting(run_dir, proc, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        try:
            waiting = json.loads((run_dir / "status.json").read_text()).get("waiting")
        except (FileNotFoundError, ValueError):
            waiting = None
        if waiting:
            return waiting
        assert time.monotonic() < deadline, "the run never said it waits for workers"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_partition_of_every_worker_is_waited_out_and_the_run_completes(shards2, tmp_path):
    run_dir, pause = tmp_path / "run", tmp_path / "pause"
    with netns.linked_hosts(2, block=5) as hosts:
        started = workers_lib.start_workers(
            shards2,
            tmp_path / "logs",
            check="quick",
            prefix=lambda i: hosts[i].prefix(),
            extra_args=lambda i: ["--insecure-plaintext-network"],
        )
        proc = None
        cut = False
        try:
            addresses = [f"{h.address}:{w.port}" for h, w in zip(hosts, started, strict=True)]
            env = dict(os.environ, **{PAUSE_ENV: f"dispatch:3={pause}"})
            proc = start_fedcompose(
                "train", "--addresses", ",".join(addresses), "--run-dir", str(run_dir),
                "--rounds", "6", "--eval-every", "0", "--round-timeout", "3",
                # Only to keep the test short: the back-off of probes (default 30 s).
                "--probe-interval-max", "4",
                env=env,
            )  # fmt: skip
            _paused(pause, proc)
            for host in hosts:
                host.cut_off()
            cut, cut_at = True, time.monotonic()
            pause.unlink()  # round 3's calls go into the partition

            waiting = _waiting(run_dir, proc)
            assert waiting["round"] == 3 and waiting["workers_up"] == []
            assert waiting["what"] == "round 3 needs 5 clients; 0 of 2 workers up, hosting 0"
            status = fedcompose("status", "--run-dir", str(run_dir), "--connect-timeout", "2")
            line = next(x for x in status.stdout.splitlines() if x.startswith("run "))
            assert "running, 2 of 6 rounds done; waiting" in line, status.stdout
            assert "for workers to return (round 3 needs 5 clients" in line, line
            assert re.search(r"gives up in 1[45]m\)", line), line  # --outage-wait 900 s
            as_json = fedcompose(
                "status", "--run-dir", str(run_dir), "--connect-timeout", "2", "--json"
            )
            summary = json.loads(as_json.stdout.splitlines()[-1])["run"]
            assert summary["waiting"]["round"] == 3, summary

            time.sleep(max(0.0, cut_at + PARTITION - time.monotonic()))
            for host in hosts:
                host.cut_off(False)
            cut = False
            _, stderr = proc.communicate(timeout=300)
        finally:
            if cut:
                for host in hosts:
                    host.cut_off(False)
            if proc is not None:
                kill_tree(proc)
            workers_lib.stop_workers(started)
    assert proc.returncode == 0, stderr[-3000:]
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5, 6]
    third = rows[2]
    # The first attempt met the partition; the run then waited, spending no retry.
    assert third["attempts"] == 2 and third["retried"] == 1 and third["degraded"] == 0, third
    # It waited from the failed attempt (two 3 s deadlines) until the probes found them.
    assert third["waited_for_workers"] >= 10, third
    # It went on as soon as one worker, enough for the round, was back and warmed up.
    assert third["live_workers"] and set(third["workers"]) == {
        f"worker{i}" for i in third["live_workers"]
    }, third
    assert "round    3 " in stderr and "| waited " in stderr and "for workers to return" in stderr
    assert "round 3 waiting for workers to return: round 3 needs 5 clients" in stderr
    assert rows[-1]["eval"]["examples"] > 0
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and not status.get("waiting")
    # Plaintext across hosts warns once per worker, not at every probe.
    assert sum("in plaintext" in x for x in stderr.splitlines()) == 2
