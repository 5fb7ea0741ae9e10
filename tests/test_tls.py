"""Provisioning kits, confinement of the executor service, and connection failures
told apart, on this machine's loopback (the tests over other network hosts are
in `test_tls_hosts.py`)."""

from __future__ import annotations

import concurrent.futures
import datetime
import http.server
import json
import os
import shutil
import socket
import socketserver
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from deploy import provision
from shared import loopback, tls
from shared.errors import UsageError
from shared.ports import free_ports
from tests.conftest import fedcompose, start_fedcompose


def _one_error_line(stderr: str, command: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith(f"fedcompose {command}:")]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    return lines[0]


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_provision_creates_kits_and_never_replaces_the_ca(tmp_path):
    kits = tmp_path / "kits"
    first = fedcompose(
        "provision", "--kits-dir", str(kits),
        "--sites", "w0=10.9.0.2:10001,w0=w0.example.org,w1=10.9.1.2",
        timeout=120, check=True,
    )  # fmt: skip
    assert "created the CA" in first.stdout
    ca_pem = (kits / "ca" / "ca.pem").read_bytes()
    for site in ("w0", "w1", "coordinator"):
        kit = kits / site
        assert stat.S_IMODE(os.stat(kit / "key.pem").st_mode) == 0o600
        assert (kit / "ca.pem").read_bytes() == ca_pem
        _cert(kit / "cert.pem").verify_directly_issued_by(_cert(kit / "ca.pem"))
    assert stat.S_IMODE(os.stat(kits / "ca" / "ca.key").st_mode) == 0o600
    # A worker's certificate names every address it is dialled at, and may only serve.
    w0 = _cert(kits / "w0" / "cert.pem")
    san = w0.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.9.0.2"]
    assert san.get_values_for_type(x509.DNSName) == ["w0.example.org"]
    assert list(w0.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    coordinator = _cert(kits / "coordinator" / "cert.pem")
    assert list(coordinator.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    # The ready command line and unit point at the kit and the dialled port.
    assert "--port 10001 --tls-dir /etc/fedcompose/w0" in (kits / "w0" / "commands.txt").read_text()
    unit = (kits / "w1" / "fedcompose-worker.service").read_text()
    assert "--tls-dir /etc/fedcompose/w1" in unit
    # It runs the coordinator's graphs (files included): as a user of its own, not root.
    assert "\nUser=fedcompose\n" in unit and "\nNoNewPrivileges=yes\n" in unit
    info = json.loads((kits / "coordinator" / "kit.json").read_text())
    assert info["workers"] == {"w0": ["10.9.0.2:10001", "w0.example.org:10001"],
                               "w1": ["10.9.1.2:10000"]}  # fmt: skip
    w0_key = (kits / "w0" / "key.pem").read_bytes()

    # Re-running adds a site with the same CA and keeps the others as they are.
    again = fedcompose(
        "provision", "--kits-dir", str(kits),
        "--sites", "w0=10.9.0.2:10001,w0=w0.example.org,w2=10.9.2.2", timeout=120, check=True,
    )  # fmt: skip
    assert "kept the existing CA" in again.stdout
    assert (kits / "ca" / "ca.pem").read_bytes() == ca_pem
    assert (kits / "w2" / "ca.pem").read_bytes() == ca_pem
    assert (kits / "w0" / "key.pem").read_bytes() == w0_key
    assert "w2" in json.loads((kits / "coordinator" / "kit.json").read_text())["workers"]
    # A changed site is refused, not silently re-issued.
    changed = fedcompose("provision", "--kits-dir", str(kits), "--sites", "w1=10.9.7.7")
    assert changed.returncode == 2
    assert "w1 exists with addresses 10.9.1.2:10000" in _one_error_line(changed.stderr, "provision")
    # Kits without their CA: a new CA would not match them.
    os.rename(kits / "ca", tmp_path / "ca-moved")
    lost = fedcompose("provision", "--kits-dir", str(kits), "--sites", "w3=10.9.3.2")
    assert lost.returncode == 2
    assert "no CA" in _one_error_line(lost.stderr, "provision")
    assert not (kits / "ca").exists() and not (kits / "w3").exists()
    bad = fedcompose("provision", "--kits-dir", str(tmp_path / "k2"), "--sites", "w 0=1.2.3.4")
    assert bad.returncode == 2 and "site name" in _one_error_line(bad.stderr, "provision")


@pytest.mark.parametrize(
    "entry, why",
    [
        ("w0=999.1.1.1", "neither an IP address nor a host name"),
        ("w0=10.0.1", "neither an IP address nor a host name"),
        ("w0=-w0-.lab", "neither an IP address nor a host name"),
        ("w0=w\u00f6rker.lab", "neither an IP address nor a host name"),  # not a traceback
        ("w0=" + "a" * 64 + ".lab", "neither an IP address nor a host name"),
        ("w0=[w0.lab]:10000", "neither an IP address nor a host name"),
        ("w0=[::1]x", "is not NAME=[IPV6]:PORT"),
        ("w0=[::1", "is not NAME=[IPV6]:PORT"),
        ("w0=10.0.0.1:", "empty port"),
        ("w0=0.0.0.0", "not an address a worker can be dialled at"),
        ("w0=::", "not an address a worker can be dialled at"),
        ("w0=fe80::1%eth0", "scoped address"),
        ("w0=10.0.0.1,w1=10.0.0.1", "w0 and w1 would both be dialled at 10.0.0.1:10000"),
        ("w0=W.lab:7,w1=w.lab:7", "w0 and w1 would both be dialled at w.lab:7"),
    ],
)
def test_sites_that_no_worker_can_be_dialled_at_are_refused(entry, why):
    with pytest.raises(UsageError, match=r"^--sites: ") as caught:
        provision.parse_sites(entry.split(","))
    assert why in str(caught.value)


def test_sites_that_are_fine():
    sites = provision.parse_sites(
        ["w0=10.0.0.1:10001", "w0=xn--wrker-jua.lab", "w1=10.0.0.1:10002", "w2=[fd00::2]"]
    )
    assert sites == {
        "w0": (["10.0.0.1", "xn--wrker-jua.lab"], 10001),
        "w1": (["10.0.0.1"], 10002),
        "w2": (["fd00::2"], 10000),
    }


def test_re_provisioning_keeps_one_coordinator_and_distinct_endpoints(tmp_path):
    kits = tmp_path / "kits"
    provision.provision(kits, provision.parse_sites(["w0=10.0.0.1"]))
    # A second coordinator identity would split the federation: refused.
    with pytest.raises(UsageError, match="this federation's coordinator is 'coordinator'"):
        provision.provision(kits, provision.parse_sites(["w1=10.0.0.2"]), "boss")
    assert not (kits / "w1").exists() and not (kits / "boss").exists()
    # A new worker at an existing worker's address and port: refused.
    with pytest.raises(UsageError, match=r"w0 and w1 would both be dialled at 10\.0\.0\.1:10000"):
        provision.provision(kits, provision.parse_sites(["w1=10.0.0.1"]))
    provision.provision(kits, provision.parse_sites(["w0=10.0.0.1", "w1=10.0.0.1:10001"]))
    assert json.loads((kits / "w0" / "kit.json").read_text())["role"] == tls.WORKER
    assert json.loads((kits / "coordinator" / "kit.json").read_text())["workers"] == {
        "w0": ["10.0.0.1:10000"],
        "w1": ["10.0.0.1:10001"],
    }
    # A damaged kit description is one line, not a traceback.
    (kits / "w0" / "kit.json").write_text("[1]")
    with pytest.raises(UsageError, match=r"kit\.json is missing or not a kit description"):
        provision.provision(kits, provision.parse_sites(["w2=10.0.0.3"]))
    shutil.rmtree(kits / "w0")
    (kits / "w9").mkdir()
    with pytest.raises(UsageError, match="w9 exists but is not a worker's kit"):
        provision.provision(kits, provision.parse_sites(["w9=10.0.0.9"]))
    # The CA key readable by others, or not the CA certificate's: refused, not used.
    os.chmod(kits / "ca" / "ca.key", 0o644)
    with pytest.raises(UsageError, match=r"CA key .* is readable by others \(mode 0644\)"):
        provision.provision(kits, provision.parse_sites(["w3=10.0.0.3"]))
    os.chmod(kits / "ca" / "ca.key", 0o600)
    other = tmp_path / "other"
    provision.provision(other, {})
    shutil.copy(other / "ca" / "ca.pem", kits / "ca" / "ca.pem")
    with pytest.raises(UsageError, match=r"ca\.key does not belong to"):
        provision.provision(kits, provision.parse_sites(["w3=10.0.0.3"]))
    assert not (kits / "w3").exists()


def _kit_with(tmp_path: Path, kits: Path, name: str, role: str, **issue_args) -> Path:
    """A kit of the federation in `kits` with a certificate made to order."""
    ca_key = serialization.load_pem_private_key((kits / "ca" / "ca.key").read_bytes(), None)
    ca_cert = _cert(kits / "ca" / "ca.pem")
    key, cert = provision.issue(ca_key, ca_cert, name, role, **issue_args)
    directory = tmp_path / f"kit-{name}-{len(list(tmp_path.iterdir()))}"
    provision.write_kit(
        directory,
        ca_cert=ca_cert,
        key=key,
        cert=cert,
        info={"role": role, "name": name, "coordinator": "coordinator", "dial": []},
    )
    return directory


@pytest.fixture
def kits(tmp_path) -> Path:
    kits = tmp_path / "kits"
    provision.provision(kits, provision.parse_sites(["w0=127.0.0.1", "w1=127.0.0.1:10001"]))
    return kits


def test_kit_problems_are_one_line_usage_errors_before_anything_starts(kits, tmp_path, shards2):
    (port,) = free_ports(1)
    run_dir = tmp_path / "run"

    def train(kit: Path):
        return fedcompose(
            "train", "--addresses", f"127.0.0.1:{port}", "--tls-dir", str(kit),
            "--run-dir", str(run_dir), timeout=120,
        )  # fmt: skip

    missing_key = tmp_path / "no-key"
    subprocess.run(["cp", "-a", str(kits / "coordinator"), str(missing_key)], check=True)
    (missing_key / "key.pem").unlink()
    result = train(missing_key)
    assert result.returncode == 2
    assert f"private key {missing_key / 'key.pem'} is missing" in _one_error_line(
        result.stderr, "train"
    )
    assert not run_dir.exists(), "nothing may start before the kit is checked"

    loose = tmp_path / "loose"
    subprocess.run(["cp", "-a", str(kits / "coordinator"), str(loose)], check=True)
    os.chmod(loose / "key.pem", 0o644)
    result = train(loose)
    assert result.returncode == 2 and "readable by others (mode 0644)" in result.stderr

    result = train(kits / "w0")
    assert result.returncode == 2
    assert "is the kit of worker 'w0', not a coordinator's kit" in result.stderr

    now = datetime.datetime.now(datetime.UTC)
    expired = _kit_with(
        tmp_path, kits, "coordinator", tls.COORDINATOR,
        not_before=now - datetime.timedelta(days=30), not_after=now - datetime.timedelta(days=1),
    )  # fmt: skip
    result = train(expired)
    assert result.returncode == 2 and "certificate expired on" in result.stderr
    assert not run_dir.exists()

    status = fedcompose("status", "--addresses", f"127.0.0.1:{port}", "--tls-dir", str(tmp_path))
    assert status.returncode == 2 and "kit description" in _one_error_line(status.stderr, "status")

    missing_worker_key = tmp_path / "w0-no-key"
    subprocess.run(["cp", "-a", str(kits / "w0"), str(missing_worker_key)], check=True)
    (missing_worker_key / "key.pem").unlink()
    worker = fedcompose(
        "worker", "--shard", str(shards2[0]), "--port", str(port),
        "--tls-dir", str(missing_worker_key), timeout=120,
    )  # fmt: skip
    assert worker.returncode == 2 and "is missing" in _one_error_line(worker.stderr, "worker")
    both = fedcompose(
        "worker", "--shard", str(shards2[0]), "--tls-dir", str(kits / "w0"),
        "--insecure-plaintext-network",
    )  # fmt: skip
    assert both.returncode == 2 and "exclude each other" in both.stderr


def test_without_a_working_loopback_shim_nothing_is_exposed(tmp_path, shards2):
    (port,) = free_ports(1)
    env = {**os.environ, "FEDCOMPOSE_LOOPBACK_SHIM": str(tmp_path / "missing.so")}
    env.pop("LD_PRELOAD", None)  # the session's own (working) shim
    worker = fedcompose("worker", "--shard", str(shards2[0]), "--port", str(port), env=env)
    assert worker.returncode == 1
    assert "the loopback shim" in _one_error_line(worker.stderr, "worker")
    assert "deploy/bootstrap.sh" in worker.stderr
    run_dir = tmp_path / "run"
    run = fedcompose("run", "--run-dir", str(run_dir), env=env)
    assert run.returncode == 1 and "loopback shim" in _one_error_line(run.stderr, "run")
    assert not run_dir.exists()

    # A shim built before the per-user filter (no feature marker) is refused
    # before anything starts: it would let other local users connect.
    noop = tmp_path / "noop.c"
    noop.write_text("int fedcompose_noop_shim;\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(tmp_path / "old.so"), str(noop)],
                   check=True)  # fmt: skip
    env["FEDCOMPOSE_LOOPBACK_SHIM"] = str(tmp_path / "old.so")
    worker = fedcompose("worker", "--shard", str(shards2[0]), "--port", str(port), env=env)
    assert worker.returncode == 1
    assert "older build that lets other users" in _one_error_line(worker.stderr, "worker")

    # A shim that loads but does not confine (here: one that does nothing but
    # carry the marker) is caught by reading what the executor listens on, and
    # it is stopped.
    marker = loopback.FEATURES.decode()
    noop.write_text(f'const char marker[] __attribute__((used)) = "{marker}";\n')
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(tmp_path / "noop.so"), str(noop)],
                   check=True)  # fmt: skip
    env["FEDCOMPOSE_LOOPBACK_SHIM"] = str(tmp_path / "noop.so")
    worker = fedcompose(
        "worker", "--shard", str(shards2[0]), "--port", str(port), "--shard-check", "quick",
        env=env, timeout=180,
    )  # fmt: skip
    assert worker.returncode != 0
    line = _one_error_line(worker.stderr, "worker")
    assert "not on loopback only" in line and "it was stopped" in line
    with socket.socket() as s:  # the port is free again: nothing kept serving it
        s.bind(("0.0.0.0", port))


def test_two_workers_started_at_once_on_one_port(shards2):
    (port,) = free_ports(1)
    args = ["worker", "--shard", str(shards2[0]), "--port", str(port), "--shard-check", "quick"]
    procs = [start_fedcompose(*args) for _ in range(2)]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and all(p.poll() is None for p in procs):
            time.sleep(0.2)
        losers = [p for p in procs if p.poll() is not None]
        assert len(losers) == 1, "exactly one of two workers on one port must give up"
        loser = losers[0]
        (winner,) = [p for p in procs if p is not loser]
        _, stderr = loser.communicate(timeout=30)
        assert loser.returncode != 0
        line = _one_error_line(stderr, "worker")
        assert f"port {port}" in line and ("in use" in line or "not available" in line)
        time.sleep(2)
        assert winner.poll() is None, "the worker that owns the port keeps serving"
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
            p.communicate(timeout=60)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def impostors() -> Iterator[dict[str, int]]:
    """Ports that are not TFF executor services: silent, HTTP, gRPC without TFF, nothing."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(silent.accept()[0])
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    web = socketserver.TCPServer(("127.0.0.1", 0), _QuietHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    other_grpc = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
    grpc_port = other_grpc.add_insecure_port("127.0.0.1:0")
    other_grpc.start()
    (closed,) = free_ports(1)
    try:
        yield {
            "silent": silent.getsockname()[1],
            "web": web.server_address[1],
            "grpc": grpc_port,
            "closed": closed,
        }
    finally:
        stop.set()
        other_grpc.stop(0)
        web.shutdown()
        web.server_close()
        silent.close()
        for s in held:
            s.close()


@pytest.mark.slow
def test_status_tells_connection_failures_apart_without_waiting(impostors):
    addresses = {kind: f"127.0.0.1:{port}" for kind, port in impostors.items()}
    started = time.monotonic()
    result = fedcompose(
        "status", "--addresses", ",".join(addresses.values()), "--connect-timeout", "120",
        "--json", timeout=300,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.returncode == 4
    rows = {row["address"]: row for row in map(json.loads, result.stdout.splitlines())}
    errors = {kind: rows[address]["error"] for kind, address in addresses.items()}
    assert not any(row["up"] for row in rows.values())
    for kind, address in addresses.items():
        assert errors[kind].startswith(f"worker {address}: "), errors[kind]
        assert "\n" not in errors[kind]
    assert "connection refused: nothing listens on port" in errors["closed"]
    assert "does not answer the gRPC (HTTP/2) handshake" in errors["silent"]
    assert "answers like a web server" in errors["web"]
    assert "not a TFF executor service (it does not implement GetExecutor)" in errors["grpc"]
    # Every answer was known long before the connect timeout (does-not-hang bound).
    assert elapsed < 100, elapsed


@pytest.mark.slow
def test_expired_certificates_and_tls_against_a_plaintext_worker(kits, tmp_path, workers2):
    """The coordinator's kit against a plaintext worker, against a worker whose
    certificate has expired (its proxy started here with such a kit), and an
    expired coordinator certificate against a valid worker."""
    from client_worker import proxy
    from coordinator.executor_client.connection import ClientTLS
    from coordinator.executor_client.probe import probe

    plain = workers2[0].address
    now = datetime.datetime.now(datetime.UTC)
    past = {
        "not_before": now - datetime.timedelta(days=30),
        "not_after": now - datetime.timedelta(days=2),
    }
    expired_worker = _kit_with(tmp_path, kits, "w0", tls.WORKER, hosts=["127.0.0.1"], **past)
    info = json.loads((expired_worker / "kit.json").read_text())
    old_kit = tls.Kit(
        directory=expired_worker,
        role=tls.WORKER,
        name="w0",
        coordinator="coordinator",
        ca_pem=(expired_worker / "ca.pem").read_bytes(),
        cert_pem=(expired_worker / "cert.pem").read_bytes(),
        key_pem=(expired_worker / "key.pem").read_bytes(),
        not_after=past["not_after"],
        info=info,
    )
    # A worker refuses to start with it...
    started = fedcompose("worker", "--shard", "x", "--tls-dir", str(expired_worker))
    assert started.returncode == 2 and "certificate expired on" in started.stderr
    # ...so its proxy (as if the certificate expired while it ran) is started here.
    expired_port, valid_port = free_ports(2)
    stale = proxy.start(expired_port, plain, old_kit, host="127.0.0.1")
    valid = proxy.start(valid_port, plain, tls.load_kit(kits / "w0", tls.WORKER), host="127.0.0.1")
    try:
        expired_address = f"127.0.0.1:{expired_port}"
        result = fedcompose(
            "status", "--addresses", f"{plain},{expired_address}", "--tls-dir",
            str(kits / "coordinator"), "--json", "--connect-timeout", "60", timeout=300,
        )  # fmt: skip
        assert result.returncode == 4
        rows = {row["address"]: row for row in map(json.loads, result.stdout.splitlines())}
        assert "speaks plaintext, not TLS" in rows[plain]["error"]
        assert "its certificate expired on" in rows[expired_address]["error"]

        coordinator_expired = _kit_with(tmp_path, kits, "coordinator", tls.COORDINATOR, **past)
        client = ClientTLS(
            (kits / "ca" / "ca.pem").read_bytes(),
            coordinator_expired / "cert.pem",
            coordinator_expired / "key.pem",
        )
        valid_address = f"127.0.0.1:{valid_port}"
        diagnosis = probe(valid_address, client)
        assert diagnosis.final
        assert "this coordinator's certificate expired on" in diagnosis.message
        # The valid coordinator kit gets through the same proxy.
        good = fedcompose(
            "status", "--addresses", valid_address, "--tls-dir", str(kits / "coordinator"),
            timeout=300,
        )  # fmt: skip
        assert good.returncode == 0, good.stdout + good.stderr
    finally:
        stale.stop()
        valid.stop()


def _serving_kit(kits: Path, cert_dir: Path) -> tls.Kit:
    """A worker's kit made of another kit's certificate and key (files copied by hand)."""
    return tls.Kit(
        directory=cert_dir,
        role=tls.WORKER,
        name=cert_dir.name,
        coordinator="coordinator",
        ca_pem=(kits / "ca" / "ca.pem").read_bytes(),
        cert_pem=(cert_dir / "cert.pem").read_bytes(),
        key_pem=(cert_dir / "key.pem").read_bytes(),
        not_after=datetime.datetime.now(datetime.UTC),
    )


def test_a_worker_serving_with_a_certificate_not_its_own_is_named(tmp_path):
    """The coordinator's certificate (client only) or another site's, served by a
    worker: each a final one-line cause, not a bare verification error."""
    from client_worker import proxy
    from coordinator.executor_client.connection import ClientTLS
    from coordinator.executor_client.probe import probe

    kits = tmp_path / "kits"
    provision.provision(kits, provision.parse_sites(["w0=127.0.0.1", "w1=127.0.0.2"]))
    coordinator = ClientTLS.from_kit(tls.load_kit(kits / "coordinator", tls.COORDINATOR))
    as_coordinator, as_w1, backend = free_ports(3)
    served = [
        proxy.start(port, f"127.0.0.1:{backend}", _serving_kit(kits, kits / site), host="127.0.0.1")
        for port, site in ((as_coordinator, "coordinator"), (as_w1, "w1"))
    ]
    try:
        wrong_role = probe(f"127.0.0.1:{as_coordinator}", coordinator)
        assert wrong_role.final
        assert "(CN=coordinator) may not serve: it is a client (coordinator) certificate" in (
            wrong_role.message
        )
        other_site = probe(f"127.0.0.1:{as_w1}", coordinator)
        assert other_site.final
        assert "its certificate names 127.0.0.2, not 127.0.0.1" in other_site.message
    finally:
        for p in served:
            p.stop()


def test_a_kit_made_of_another_kits_files_is_refused_when_loaded(kits, tmp_path):
    """Files copied between kits by hand: a worker's certificate and key in the
    coordinator's kit (and the reverse), and a CA certificate with the right name
    but another key (a re-made CA). Each is a one-line usage error at start."""
    from cryptography.x509.oid import NameOID

    def copy(source: str, name: str) -> Path:
        directory = tmp_path / name
        shutil.copytree(kits / source, directory)
        return directory

    def with_pair_of(kit: str, donor: str) -> Path:
        """`kit`'s directory with `donor`'s certificate and key in it."""
        directory = copy(kit, f"{kit}-with-{donor}-cert")
        for file in ("cert.pem", "key.pem"):
            (directory / file).unlink()
            shutil.copy(kits / donor / file, directory / file)
        return directory

    swapped = with_pair_of("coordinator", "w0")
    with pytest.raises(UsageError, match=r"\(CN=w0\) is not a coordinator's certificate"):
        tls.load_kit(swapped, tls.COORDINATOR)
    reverse = with_pair_of("w0", "coordinator")
    with pytest.raises(UsageError, match=r"\(CN=coordinator\) is not a worker's certificate"):
        tls.load_kit(reverse, tls.WORKER)

    ca = _cert(kits / "ca" / "ca.pem")
    name = ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    _, same_name = provision.make_ca(name)
    remade = copy("coordinator", "coordinator-remade-ca")
    (remade / "ca.pem").write_bytes(same_name.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(UsageError, match=r"cert\.pem was not issued by the kit's ca\.pem"):
        tls.load_kit(remade, tls.COORDINATOR)
    tls.load_kit(kits / "coordinator", tls.COORDINATOR)  # the kit itself is fine
    tls.load_kit(kits / "w0", tls.WORKER)


@pytest.mark.parametrize("directory", ["my shims", "a:b"])
def test_a_shim_path_that_ld_preload_cannot_carry_is_refused(tmp_path, monkeypatch, directory):
    """ld.so splits LD_PRELOAD at spaces and colons: the shim would silently not
    load, and executors TFF starts itself would listen on every interface."""
    place = tmp_path / directory
    place.mkdir()
    shutil.copy(loopback.shim_path(), place / loopback.SHIM_NAME)
    monkeypatch.setenv(loopback.ENV_OVERRIDE, str(place / loopback.SHIM_NAME))
    with pytest.raises(loopback.ConfinementError, match="LD_PRELOAD cannot carry"):
        loopback.environment({})


_TFF_LOCAL_EXECUTOR = """
import json, psutil
from shared import loopback
loopback.confine_children()
import tensorflow_federated as tff
tff.backends.native.set_sync_local_cpp_execution_context()
assert tff.tensorflow.computation(lambda: 1)() == 1
found = {}
for child in psutil.Process().children(recursive=True):
    if child.name() == "worker_binary":
        found[child.pid] = loopback.listening_addresses(child.pid)
        child.kill()
print(json.dumps(found))
"""


def test_tffs_own_local_executor_listens_on_loopback_only(tmp_path):
    """TFF's local context (the tests' references, `bench`'s tff_local) starts a
    `worker_binary` of its own, unchecked after start: `confine_children` alone
    must keep it on loopback (nothing inherited from this test session)."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    result = subprocess.run(
        [sys.executable, "-c", _TFF_LOCAL_EXECUTOR],
        capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1], timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(found) == 1, found
    (listening,) = found.values()
    assert listening and all(loopback.is_loopback(a) for a, _ in listening), listening


def test_provisions_at_once_make_one_federation(tmp_path):
    """Several `provision`s started together on a new directory: one CA, every
    site's kit signed by it and listed for the coordinator, no stray CA key."""
    kits = tmp_path / "kits"
    start = threading.Barrier(6)

    def one(i: int) -> None:
        start.wait()
        provision.provision(kits, provision.parse_sites([f"w{i}=10.0.0.{i + 1}"]))

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        list(pool.map(one, range(6)))
    assert sorted(p.name for p in kits.iterdir() if not p.name.startswith(".provision")) == [
        "ca", "coordinator", "w0", "w1", "w2", "w3", "w4", "w5",
    ]  # fmt: skip
    info = json.loads((kits / "coordinator" / "kit.json").read_text())
    assert sorted(info["workers"]) == [f"w{i}" for i in range(6)]
    for i in range(6):
        tls.load_kit(kits / f"w{i}", tls.WORKER)


def test_an_ipv6_worker_dialled_in_another_spelling_connects(tmp_path):
    """gRPC checks the certificate against the address as written: `[0:0::1]`
    must reach a worker whose certificate names `::1` (as Python's `ssl`, and so
    the probe, already agree it should)."""
    from client_worker import proxy
    from coordinator.executor_client.connection import ClientTLS, open_channel
    from coordinator.executor_client.probe import probe

    kits = tmp_path / "kits"
    provision.provision(kits, provision.parse_sites(["w0=0:0:0:0:0:0:0:1"]))
    assert json.loads((kits / "w0" / "kit.json").read_text())["dial"] == ["[::1]:10000"]
    port, backend = free_ports(2)
    served = proxy.start(
        port, f"127.0.0.1:{backend}", tls.load_kit(kits / "w0", tls.WORKER), host="[::1]"
    )
    coordinator = ClientTLS.from_kit(tls.load_kit(kits / "coordinator", tls.COORDINATOR))
    try:
        for address in (f"[::1]:{port}", f"[0:0:0:0:0:0:0:1]:{port}", f"[0::01]:{port}"):
            assert probe(address, coordinator).ok
            channel = open_channel(address, coordinator, [])
            try:
                grpc.channel_ready_future(channel).result(timeout=15)
            finally:
                channel.close()
    finally:
        served.stop()


def test_kits_are_written_0644_or_tighter_whatever_the_umask(tmp_path):
    """Under `umask 000` provision wrote ca.pem, cert.pem and kit.json
    world-writable, and the kits directory 0777."""
    kits = tmp_path / "kits"

    def provision_with_umask_000(*sites: str) -> None:
        result = subprocess.run(
            ["sh", "-c", 'umask 000 && exec "$0" -m deploy.cli "$@"', sys.executable,
             "provision", "--kits-dir", str(kits), "--sites", ",".join(sites)],
            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr

    provision_with_umask_000("w0=127.0.0.1")
    provision_with_umask_000("w1=127.0.0.2")  # rewrites the coordinator's kit.json
    modes = {
        str(p.relative_to(kits)): stat.S_IMODE(os.stat(p).st_mode) for p in [kits, *kits.rglob("*")]
    }
    assert not {name: f"{m:04o}" for name, m in modes.items() if m & 0o022}, modes
    for key in ("ca/ca.key", "w0/key.pem", "w1/key.pem", "coordinator/key.pem"):
        assert modes[key] == 0o600
    tls.load_kit(kits / "w1", tls.WORKER)
    tls.load_kit(kits / "coordinator", tls.COORDINATOR)


@pytest.mark.parametrize("target", [".", "ca.pem", "cert.pem", "kit.json", "key.pem"])
def test_a_kit_others_can_write_is_refused_on_both_sides(kits, tmp_path, target):
    """A kit whose trust anchor others can write (its directory, ca.pem, its
    certificate, its description) was used as it was; refused in one line
    saying how to fix it, by a worker and by the coordinator, before anything
    starts."""
    (port,) = free_ports(1)
    for site, role in (("w0", tls.WORKER), ("coordinator", tls.COORDINATOR)):
        kit = tmp_path / f"{site}-loose"
        shutil.copytree(kits / site, kit)
        path = kit if target == "." else kit / target
        mode = 0o777 if target == "." else 0o666 if target != "key.pem" else 0o622
        os.chmod(path, mode)
        with pytest.raises(UsageError, match=rf"is writable by others \(mode {mode:04o}\)"):
            tls.load_kit(kit, role)
        if role == tls.WORKER:
            result = fedcompose(
                "worker", "--shard", "x", "--port", str(port), "--tls-dir", str(kit)
            )
            line = _one_error_line(result.stderr, "worker")
        else:
            run_dir = tmp_path / "run"
            result = fedcompose(
                "train", "--addresses", f"127.0.0.1:{port}", "--tls-dir", str(kit),
                "--run-dir", str(run_dir), timeout=120,
            )  # fmt: skip
            line = _one_error_line(result.stderr, "train")
            assert not run_dir.exists()
        assert result.returncode == 2
        assert line.endswith(f"`chmod go-w {path}`"), line


def test_a_ca_pem_of_several_cas_is_refused_and_refusals_are_told_truly(tmp_path):
    """A ca.pem holding two CAs made a refused handshake say "see the worker's
    log" (a log with nothing in it); a forged CA of the federation's name made
    the message blame the worker's valid certificate ("certificate signature
    failure"). A kit's ca.pem now holds one CA (refused in one line on both
    sides), and the diagnosis says what it can tell from both certificates."""
    from cryptography.x509.oid import NameOID

    from client_worker import proxy
    from coordinator.executor_client.connection import ClientTLS
    from coordinator.executor_client.probe import probe

    a, b = tmp_path / "a", tmp_path / "b"
    for kits in (a, b):
        provision.provision(kits, provision.parse_sites(["w0=127.0.0.1"]))
    a_ca, b_ca = (k / "ca" / "ca.pem" for k in (a, b))
    name = _cert(a_ca).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    _, forged = provision.make_ca(name)
    forged_pem = forged.public_bytes(serialization.Encoding.PEM)

    def kit_with_ca(site: Path, ca_pem: bytes) -> Path:
        kit = tmp_path / f"{site.parent.name}-{site.name}-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(site, kit)
        (kit / "ca.pem").write_bytes(ca_pem)
        return kit

    both = a_ca.read_bytes() + b_ca.read_bytes()
    for site, role in ((a / "coordinator", tls.COORDINATOR), (a / "w0", tls.WORKER)):
        for bundle in (both, forged_pem + a_ca.read_bytes()):
            with pytest.raises(UsageError, match=r"ca\.pem holds 2 certificates; a kit's ca\.pem"):
                tls.load_kit(kit_with_ca(site, bundle), role)
    with pytest.raises(UsageError, match=r"has the name of its issuer \(CN=.*\) but another key"):
        tls.load_kit(kit_with_ca(a / "coordinator", forged_pem), tls.COORDINATOR)

    a_port, b_port, backend = free_ports(3)
    served = [
        proxy.start(
            port, f"127.0.0.1:{backend}", tls.load_kit(k / "w0", tls.WORKER), host="127.0.0.1"
        )
        for port, k in ((a_port, a), (b_port, b))
    ]
    coordinator = a / "coordinator"
    try:
        # The coordinator trusts both CAs; federation b's worker trusts only b's.
        two = probe(
            f"127.0.0.1:{b_port}",
            ClientTLS(both, coordinator / "cert.pem", coordinator / "key.pem"),
        )
        assert two.final and "worker's log" not in two.message
        assert f"issued by {_cert(a_ca).subject.rfc4514_string()}" in two.message
        # The worker's TLS gate refuses during the handshake, before its own
        # certificate can be read: it is not named, but what is said is true.
        assert "the worker does not trust this coordinator's CA" in two.message
        # A CA of the federation's name with another key, against a valid worker.
        remade = probe(
            f"127.0.0.1:{a_port}",
            ClientTLS(forged_pem, coordinator / "cert.pem", coordinator / "key.pem"),
        )
        assert remade.final
        assert "was not signed with that CA's key" in remade.message
        assert "another federation" not in remade.message
    finally:
        for p in served:
            p.stop()


def test_a_revocation_list_against_a_ca_key_that_cannot_sign_is_refused_in_one_line():
    """A CA certificate carrying a key-agreement key (X25519) signed no list:
    refused as a usage error, where checking the signature with it used to raise TypeError."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, x25519
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    signer = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedcompose CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(x25519.X25519PrivateKey.generate().public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(signer, hashes.SHA256())
    )
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(name)
        .last_update(now)
        .next_update(now + datetime.timedelta(days=1))
        .sign(signer, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    with pytest.raises(UsageError, match=r"crl\.pem is not signed by this federation's CA"):
        tls.parse_crl(crl.public_bytes(pem), ca.public_bytes(pem))
