"""Workers on other network hosts: each in its own network namespace, reached
over a virtual Ethernet link by address, as on separate machines."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from deploy import workers as workers_lib
from tests.conftest import fedcompose

SUBNET = 10_200 + os.getpid() % 50  # a private /24 per test run


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def hosts() -> Iterator[list[tuple[str, str]]]:
    """Two network namespaces, each linked to this one; yields (name, address)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.fail(
            "needs root and iproute2 to create network namespaces (CI runs as root)",
            pytrace=False,
        )
    made: list[tuple[str, str]] = []
    third = SUBNET % 250
    try:
        for i in range(2):
            name = f"fc{os.getpid()}h{i}"
            outer, inner = f"fc{os.getpid() % 100000}o{i}", f"fc{os.getpid() % 100000}i{i}"
            _ip("netns", "add", name)
            made.append((name, outer))
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", name)
            _ip("addr", "add", f"10.{third}.{i}.1/24", "dev", outer)
            _ip("link", "set", outer, "up")
            _ip("-n", name, "addr", "add", f"10.{third}.{i}.2/24", "dev", inner)
            _ip("-n", name, "link", "set", inner, "up")
            _ip("-n", name, "link", "set", "lo", "up")
        yield [(name, f"10.{third}.{i}.2") for i, (name, _) in enumerate(made)]
    finally:
        for name, outer in made:
            subprocess.run(["ip", "link", "del", outer], capture_output=True)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.slow
def test_training_over_workers_on_two_network_hosts(hosts, shards2, tmp_path):
    started = workers_lib.start_workers(
        shards2,
        tmp_path / "logs",
        check="quick",
        prefix=lambda i: ["ip", "netns", "exec", hosts[i][0]],
        # Plaintext across hosts is an explicit opt-in (mutual TLS between
        # hosts: tests/test_tls_hosts.py).
        extra_args=lambda i: ["--insecure-plaintext-network"],
    )
    try:
        addresses = [f"{address}:{w.port}" for (_, address), w in zip(hosts, started, strict=True)]
        # The workers are not on this host's loopback: only the link reaches them.
        unreachable = fedcompose(
            "status",
            "--addresses",
            f"localhost:{started[0].port}",
            "--connect-timeout",
            "2",
            timeout=120,
        )
        assert unreachable.returncode == 4
        status = fedcompose("status", "--addresses", ",".join(addresses), "--json", timeout=120)
        assert status.returncode == 0, status.stderr
        rows = [json.loads(line) for line in status.stdout.splitlines()]
        assert [r["up"] for r in rows] == [True, True]
        assert sum(r["clients"] for r in rows) == 60
        run_dir = tmp_path / "run"
        fedcompose(
            "train",
            "--addresses",
            ",".join(addresses),
            "--rounds",
            "3",
            "--eval-every",
            "3",
            "--run-dir",
            str(run_dir),
            check=True,
        )
        last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        assert last["round"] == 3 and last["eval"]["examples"] == 360
        assert len(last["workers"]) == 2
    finally:
        workers_lib.stop_workers(started)
