"""Other network hosts for tests: network namespaces linked to this one by veth.

Creating namespaces needs root and iproute2. A test that needs them and lacks
them fails with the reason (CI runs as root), never skips silently.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest


def require_root() -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.fail(
            "this test needs root and iproute2 (`ip`) to create network namespaces as other "
            "hosts; run it as root (CI does)",
            pytrace=False,
        )


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclasses.dataclass(frozen=True)
class Host:
    namespace: str
    address: str
    """This host's address, as other hosts dial it."""
    gateway: str
    """The address of the machine running the test, as seen from this host."""
    gateway6: str = ""
    """The same over IPv6 (a unique-local address on the link)."""
    address6: str = ""
    """This host's IPv6 address, as other hosts dial it."""

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.namespace]

    def run(self, args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.prefix(), *args], capture_output=True, text=True, timeout=timeout
        )

    def cut_off(self, cut: bool = True) -> None:
        """Drops every packet between this host and any other, silently, as a
        failed switch does (loopback inside it still works); `cut=False` mends it."""
        for chain, direction in (("INPUT", "-i"), ("OUTPUT", "-o")):
            for iptables in ("iptables", "ip6tables"):
                rule = [chain, "!", direction, "lo", "-j", "DROP"]
                result = self.run([iptables, "-I" if cut else "-D", *rule], timeout=30)
                assert result.returncode == 0, result.stderr

    def listening_ports(self) -> list[tuple[str, int]]:
        """(address, port) of every TCP listener inside this host."""
        out = self.run(["ss", "-ltnH"]).stdout
        found = []
        for line in out.splitlines():
            local = line.split()[3]
            address, _, port = local.rpartition(":")
            found.append((address.strip("[]"), int(port)))
        return found

    def connect_results(self, address: str, ports: list[int], timeout: float = 2.0) -> dict:
        """From inside this host: port -> "connected" or the error connecting to `address`."""
        script = (
            "import json, socket, sys\n"
            "out = {}\n"
            "for port in json.loads(sys.argv[2]):\n"
            "    try:\n"
            f"        socket.create_connection((sys.argv[1], port), timeout={timeout}).close()\n"
            "        out[port] = 'connected'\n"
            "    except OSError as e:\n"
            "        out[port] = type(e).__name__\n"
            "print(json.dumps(out))\n"
        )
        import json

        result = self.run([sys.executable, "-c", script, address, json.dumps(ports)])
        assert result.returncode == 0, result.stderr
        return {int(k): v for k, v in json.loads(result.stdout).items()}


@contextlib.contextmanager
def linked_hosts(count: int, block: int) -> Iterator[list[Host]]:
    """`count` namespaces, each on its own /24 linked to this host.

    `block` (0-9) keeps concurrently used sets of hosts of one test run apart.
    """
    require_root()
    pid = os.getpid()
    # One range of subnets per parallel test process (pytest-xdist's gw0, gw1, ...),
    # so that hosts of tests running at once never share a subnet.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    slot = int(worker[2:]) if worker[2:].isdigit() else 0
    if not 0 <= slot < 15:
        raise RuntimeError(f"network namespaces: at most 15 parallel test processes ({worker})")
    third = 100 + slot * 10 + block
    made: list[tuple[str, str]] = []
    try:
        for i in range(count):
            name = f"fc{pid}b{block}h{i}"
            outer = f"fc{pid % 100000}b{block}o{i}"
            inner = f"fc{pid % 100000}b{block}i{i}"
            ip("netns", "add", name)
            made.append((name, outer))
            ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            ip("link", "set", inner, "netns", name)
            ip("addr", "add", f"10.{third}.{i}.1/24", "dev", outer)
            ip("link", "set", outer, "up")
            ip("-n", name, "addr", "add", f"10.{third}.{i}.2/24", "dev", inner)
            ip("-n", name, "link", "set", inner, "up")
            ip("-n", name, "link", "set", "lo", "up")
            # IPv6 too: an executor listening on `[::]` would be reachable over it
            # even if its IPv4 side were not (`nodad`: usable at once).
            ip("-6", "addr", "add", f"fd00:fc:{third}:{i}::1/64", "dev", outer, "nodad")
            ip("-n", name, "-6", "addr", "add", f"fd00:fc:{third}:{i}::2/64", "dev", inner, "nodad")
        yield [
            Host(
                name,
                f"10.{third}.{i}.2",
                f"10.{third}.{i}.1",
                f"fd00:fc:{third}:{i}::1",
                f"fd00:fc:{third}:{i}::2",
            )
            for i, (name, _) in enumerate(made)
        ]
    finally:
        for name, outer in made:
            subprocess.run(["ip", "link", "del", outer], capture_output=True)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
