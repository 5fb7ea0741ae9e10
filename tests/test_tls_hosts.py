"""Nothing reachable that should not be, checked from other network hosts
(network namespaces linked to this one): mutual TLS between hosts, every
refusal with its one-line reason, executor ports confined to loopback, and a
whole `fedcompose run` that no other host can reach. Needs root: fails (not
skips) without it."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import grpc
import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from coordinator.executor_client.connection import ClientTLS
from coordinator.executor_client.probe import probe
from deploy import provision
from deploy import workers as workers_lib
from shared import loopback, tls
from tests import netns
from tests.conftest import fedcompose, kill_tree, start_fedcompose

pytestmark = pytest.mark.slow

GET_EXECUTOR = "/tensorflow_federated.v0.ExecutorGroup/GetExecutor"


def _status(addresses: list[str], *flags: str, timeout: str = "30") -> tuple[int, dict]:
    result = fedcompose(
        "status", "--addresses", ",".join(addresses), "--json", "--connect-timeout", timeout,
        *flags, timeout=300,
    )  # fmt: skip
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    rows = {row["address"]: row for row in map(json.loads, result.stdout.splitlines())}
    assert set(rows) == set(addresses), result.stdout + result.stderr
    return result.returncode, rows


def _kit_of_same_ca(kits: Path, tmp_path: Path, name: str, role: str) -> Path:
    ca_key = serialization.load_pem_private_key((kits / "ca" / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((kits / "ca" / "ca.pem").read_bytes())
    key, cert = provision.issue(ca_key, ca_cert, name, role)
    directory = tmp_path / f"kit-{name}"
    provision.write_kit(
        directory,
        ca_cert=ca_cert,
        key=key,
        cert=cert,
        info={"role": role, "name": name, "coordinator": "coordinator"},
    )
    return directory


def _raw_call(address: str, client: ClientTLS) -> grpc.StatusCode:
    channel = grpc.secure_channel(address, client.channel_credentials())
    try:
        channel.unary_unary(GET_EXECUTOR)(b"", timeout=10)
    except grpc.RpcError as e:
        return e.code()
    finally:
        channel.close()
    return grpc.StatusCode.OK


def test_training_over_mutual_tls_between_hosts_and_every_refusal(shards2, tmp_path):
    with netns.linked_hosts(2, block=1) as hosts:
        kits = tmp_path / "kits"
        provision.provision(
            kits, provision.parse_sites([f"w{i}={h.address}" for i, h in enumerate(hosts)])
        )
        started = workers_lib.start_workers(
            shards2,
            tmp_path / "logs",
            check="quick",
            prefix=lambda i: hosts[i].prefix(),
            extra_args=lambda i: ["--tls-dir", str(kits / f"w{i}")],
        )
        try:
            addresses = [f"{h.address}:{w.port}" for h, w in zip(hosts, started, strict=True)]
            coordinator = ["--tls-dir", str(kits / "coordinator")]

            # The coordinator's kit: up, and training works over mutual TLS.
            code, rows = _status(addresses, *coordinator)
            assert code == 0 and all(r["up"] for r in rows.values()), rows
            assert sum(r["clients"] for r in rows.values()) == 60
            run_dir = tmp_path / "run"
            fedcompose(
                "train", "--addresses", ",".join(addresses), *coordinator, "--rounds", "3",
                "--eval-every", "3", "--run-dir", str(run_dir), check=True,
            )  # fmt: skip
            last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
            assert last["round"] == 3 and last["eval"]["examples"] == 360
            assert len(last["workers"]) == 2

            target = addresses[0]
            # A plaintext client.
            code, rows = _status([target])
            assert code == 4
            assert "speaks TLS and this coordinator dialled in plaintext" in rows[target]["error"]
            # A coordinator of another federation (certificate from another CA).
            other = tmp_path / "other"
            provision.provision(other, {})
            code, rows = _status([target], "--tls-dir", str(other / "coordinator"))
            assert code == 4
            assert "not signed by the CA of the coordinator's kit" in rows[target]["error"]
            # A certificate of this federation that is not the coordinator's:
            # refused on every call, by the worker's authorization.
            intruder = _kit_of_same_ca(kits, tmp_path, "intruder", tls.COORDINATOR)
            code, rows = _status([target], "--tls-dir", str(intruder))
            assert code == 4
            assert (
                "refused GetExecutor: certificate 'intruder' may not call this worker; only "
                "the coordinator 'coordinator' may" in rows[target]["error"]
            )
            assert "denied GetExecutor" in (tmp_path / "logs" / "worker-0.log").read_text()
            ca = (kits / "coordinator" / "ca.pem").read_bytes()
            # A worker's certificate used as a client (a compromised worker
            # calling another): refused at the handshake, told apart.
            as_client = ClientTLS(ca, kits / "w1" / "cert.pem", kits / "w1" / "key.pem")
            assert _raw_call(target, as_client) == grpc.StatusCode.UNAVAILABLE
            diagnosis = probe(target, as_client)
            assert diagnosis.final and "not a client certificate" in diagnosis.message
            # A client without a certificate.
            anonymous = ClientTLS(ca, None, None)
            assert _raw_call(target, anonymous) == grpc.StatusCode.UNAVAILABLE
            assert "presented no certificate" in probe(target, anonymous).message
            # A name mismatch: the worker dialled at an address its certificate does not name.
            inner = hosts[0].run(["ip", "-o", "link"]).stdout
            device = next(
                line.split(":")[1].strip().split("@")[0]
                for line in inner.splitlines()
                if "veth" in line or "@if" in line
            )
            extra = hosts[0].address.rsplit(".", 1)[0] + ".3"
            netns.ip("-n", hosts[0].namespace, "addr", "add", f"{extra}/24", "dev", device)
            renamed = f"{extra}:{started[0].port}"
            code, rows = _status([renamed], *coordinator)
            assert code == 4
            assert (
                f"its certificate names {hosts[0].address}, not {extra}" in rows[renamed]["error"]
            )

            # The raw executor port is on the worker host's loopback only: the
            # other host cannot reach it; only the TLS port is public.
            listeners = hosts[0].listening_ports()
            public = [(a, p) for a, p in listeners if p == started[0].port]
            # `ss` writes the dual-stack wildcard as "*".
            assert public and all(a in ("*", "::", "0.0.0.0") for a, _ in public), listeners
            raw = [(a, p) for a, p in listeners if p != started[0].port]
            assert raw and all(loopback.is_loopback(a) for a, _ in raw), listeners
            for _, port in raw:
                for address in (hosts[0].address, hosts[0].address6):
                    with pytest.raises(ConnectionRefusedError):
                        socket.create_connection((address, port), timeout=5)
        finally:
            workers_lib.stop_workers(started)


def test_default_worker_is_loopback_only_and_plaintext_needs_an_opt_in(shards2, tmp_path):
    with netns.linked_hosts(1, block=2) as (host,):
        started = workers_lib.start_workers(
            shards2,
            tmp_path / "logs",
            check="quick",
            prefix=lambda i: host.prefix(),
            extra_args=lambda i: [] if i == 0 else ["--insecure-plaintext-network"],
        )
        try:
            default, opted_in = (f"{host.address}:{w.port}" for w in started)
            code, rows = _status([default, opted_in], timeout="60")
            assert code == 4
            assert not rows[default]["up"]
            assert "connection refused: nothing listens on port" in rows[default]["error"]
            assert rows[opted_in]["up"], rows[opted_in]
            log = (tmp_path / "logs" / "worker-1.log").read_text()
            assert "WITHOUT TLS OR AUTHENTICATION" in log
            assert "loopback only" in (tmp_path / "logs" / "worker-0.log").read_text()
        finally:
            workers_lib.stop_workers(started)


def test_a_host_that_does_not_answer_is_told_apart(tmp_path):
    with netns.linked_hosts(1, block=3) as (host,):
        # The host gets our packets but cannot answer: no route back.
        route = host.run(["ip", "-o", "route"]).stdout.splitlines()[0].split()
        netns.ip("-n", host.namespace, "route", "del", *route[:3])
        address = f"{host.address}:10000"
        started = time.monotonic()
        code, rows = _status([address], timeout="5")
        assert code == 4
        assert "no answer within" in rows[address]["error"]
        assert "(waited 5s)" in rows[address]["error"]
        assert time.monotonic() - started < 120


def _tree_listeners(pid: int) -> list[tuple[str, int]]:
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    found = []
    for proc in tree:
        try:
            for c in proc.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    found.append((c.laddr.ip, c.laddr.port))
        except psutil.Error:
            continue
    return found


def test_fedcompose_run_opens_no_port_another_host_can_reach(tmp_path):
    """Issue 9.1: every port a running `fedcompose run` listens on (workers and
    the coordinator's server executor) refuses connections from another host at
    this host's address, while the run trains normally."""
    with netns.linked_hosts(1, block=4) as (host,):
        # The method can see an exposed port: a wildcard listener here is
        # reachable, over IPv4 and IPv6.
        control = socket.socket(socket.AF_INET6)
        control.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        control.bind(("::", 0))
        control.listen(4)
        control_port = control.getsockname()[1]
        try:
            for gateway in (host.gateway, host.gateway6):
                assert host.connect_results(gateway, [control_port]) == {control_port: "connected"}
        finally:
            control.close()

        run_dir = tmp_path / "run"
        rounds = 150
        proc = start_fedcompose(
            "run", "--workers", "2", "--rounds", str(rounds), "--eval-every", "0",
            "--run-dir", str(run_dir),
        )  # fmt: skip
        try:
            metrics = run_dir / "metrics.jsonl"
            deadline = time.monotonic() + 400
            while not (metrics.exists() and metrics.read_text().strip()):
                assert proc.poll() is None, proc.stderr.read()[-3000:]
                assert time.monotonic() < deadline, "the run did not start training"
                time.sleep(0.2)
            listeners = _tree_listeners(proc.pid)
            ports = sorted({p for _, p in listeners})
            # Two workers and the coordinator's server executor, all on loopback.
            assert len(ports) >= 3, listeners
            assert all(loopback.is_loopback(a) for a, _ in listeners), listeners
            for gateway in (host.gateway, host.gateway6):
                results = host.connect_results(gateway, ports)
                assert all(r != "connected" for r in results.values()), (gateway, results)
                assert set(results.values()) == {"ConnectionRefusedError"}, (gateway, results)
            assert proc.poll() is None, "the ports were checked while the run was running"
            _, stderr = proc.communicate(timeout=600)
        finally:
            kill_tree(proc)
        assert proc.returncode == 0, stderr[-3000:]
        rows = run_dir.joinpath("metrics.jsonl").read_text().splitlines()
        assert len(rows) == rounds
