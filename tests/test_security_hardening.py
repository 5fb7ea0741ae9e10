"""Issue 23, security items 1, 2, 3, 4 and 7: other local users, the audit log,
connection floods, a worker's site, revocation. Real workers, real TLS, real
gRPC. The tests that switch users or make network namespaces need root and
fail (not skip) without it."""

from __future__ import annotations

import datetime
import json
import os
import pwd
import resource
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from deploy import provision
from deploy import workers as workers_lib
from shared import tls
from shared.ports import free_ports
from tests import netns
from tests.conftest import fedcompose, kill_tree, start_fedcompose

SYSTEM_PYTHON = "/usr/bin/python3"
"""Another user cannot run the project's virtualenv (it lives under /root)."""

# Speaks HTTP/2 to a port as gRPC would, and says what came back: "settings"
# (a gRPC server answered), "closed" (closed without a word) or the error.
_HTTP2_PROBE = r"""
import json, socket, sys
out = {}
for port in json.loads(sys.argv[1]):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            answer = s.recv(64)
        out[port] = "settings" if len(answer) >= 9 and answer[3] == 4 else (
            "closed" if not answer else repr(answer[:16]))
    except OSError as e:
        out[port] = type(e).__name__
print(json.dumps(out))
"""


def _nobody() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.fail("this test needs root, to run a process as another user", pytrace=False)
    user = pwd.getpwnam("nobody")
    assert user.pw_uid != 0
    return user


def _http2_from(ports: list[int], user: pwd.struct_passwd | None) -> dict[int, str]:
    kwargs = {} if user is None else {"user": user.pw_uid, "group": user.pw_gid}
    result = subprocess.run(
        [SYSTEM_PYTHON, "-c", _HTTP2_PROBE, json.dumps(ports)],
        capture_output=True, text=True, timeout=120, cwd="/", env={"PATH": "/usr/bin:/bin"},
        extra_groups=[] if user is not None else None, **kwargs,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return {int(k): v for k, v in json.loads(result.stdout).items()}


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


@pytest.mark.slow
def test_other_local_users_cannot_drive_any_port_of_a_run(tmp_path):
    """Item 1: while `fedcompose run` trains, a process of another user (nobody)
    gets no gRPC answer from any port the run listens on (each connection is
    closed unanswered), the run's own user does, and the run trains to the end."""
    nobody = _nobody()
    run_dir = tmp_path / "run"
    rounds = 120
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
        ports = sorted({p for _, p in _tree_listeners(proc.pid)})
        # Two workers and the coordinator's server executor.
        assert len(ports) >= 3, ports
        # The method can tell: this user is answered on every port...
        assert set(_http2_from(ports, None).values()) == {"settings"}
        # ...the other user on none.
        refused = _http2_from(ports, nobody)
        assert all(r in ("closed", "ConnectionResetError") for r in refused.values()), refused
        assert proc.poll() is None, "the ports were checked while the run was running"
        _, stderr = proc.communicate(timeout=600)
    finally:
        kill_tree(proc)
    assert proc.returncode == 0, stderr[-3000:]
    assert len(metrics.read_text().splitlines()) == rounds
    # Each refusal left a line in a worker's (or the server executor's) log.
    logs = "".join(p.read_text(errors="replace") for p in (run_dir / "logs").glob("*.log"))
    assert f"of user {nobody.pw_uid}: only user {os.getuid()} may connect" in logs


def _wait_for(path: Path, *needles: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        if all(n in text for n in needles):
            return text
        time.sleep(0.2)
    raise AssertionError(f"{path} lacks {needles}:\n{text[-3000:]}")


def _lines(text: str, event: str) -> list[str]:
    return [line for line in text.splitlines() if line.split(" ", 2)[1:2] == [event]]


def _issue(kits: Path, name: str, role: str, directory: Path, **validity) -> Path:
    ca_key = serialization.load_pem_private_key((kits / "ca" / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((kits / "ca" / "ca.pem").read_bytes())
    key, cert = provision.issue(ca_key, ca_cert, name, role, **validity)
    provision.write_kit(
        directory, ca_cert=ca_cert, key=key, cert=cert,
        info={"role": role, "name": name, "coordinator": "coordinator"},
    )  # fmt: skip
    return directory


def _tls_client(port: int, ca: bytes, kit: Path | None) -> str:
    """A TLS handshake with the worker at `port`; what it came to."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=ca.decode())
    if kit is not None:
        context.load_cert_chain(kit / "cert.pem", kit / "key.pem")
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw) as s,
        ):
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            s.recv(16)
    except (OSError, ssl.SSLError) as e:
        return f"refused: {e}"
    return "completed"


def _start_tls_worker(shard: Path, logs: Path, port: int, kit: Path, prefix=None):
    return workers_lib.start_workers(
        [shard], logs, base_port=port, check="quick",
        extra_args=lambda i: ["--tls-dir", str(kit)],
        prefix=(lambda i: prefix) if prefix else None,
    )  # fmt: skip


@pytest.mark.slow
def test_audit_log_names_every_refused_connection_and_every_call(shards2, tmp_path):
    """Item 2: plaintext, no certificate, another CA's and an expired certificate
    each leave a `refused` line with the peer, the reason and (where one was
    sent) the certificate's subject and issuer; the coordinator's calls each
    leave a `call` line with identity, method and the request's sha256."""
    (port,) = free_ports(1)
    kits = tmp_path / "kits"
    provision.provision(kits, provision.parse_sites([f"w0=127.0.0.1:{port}"]))
    other = tmp_path / "other"
    provision.provision(other, {})
    ca = (kits / "ca" / "ca.pem").read_bytes()
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    expired = _issue(
        kits, "coordinator", tls.COORDINATOR, tmp_path / "expired",
        not_before=past - datetime.timedelta(days=1), not_after=past,
    )  # fmt: skip
    started = _start_tls_worker(shards2[0], tmp_path / "logs", port, kits / "w0")
    audit = tmp_path / "logs" / "worker-0.audit.log"
    try:
        assert "audit log" in (tmp_path / "logs" / "worker-0.log").read_text()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            assert s.recv(16) == b""
        _wait_for(audit, 'reason="not TLS (plaintext')
        assert _tls_client(port, ca, None).startswith("refused")
        _wait_for(audit, 'reason="no client certificate"')
        assert _tls_client(port, ca, other / "coordinator").startswith("refused")
        other_ca = x509.load_pem_x509_certificate((other / "ca" / "ca.pem").read_bytes())
        _wait_for(audit, 'reason="certificate not signed by this federation\'s CA"')
        assert _tls_client(port, ca, expired).startswith("refused")
        text = _wait_for(audit, 'reason="certificate expired"')
        refused = _lines(text, "refused")
        assert len(refused) == 4, text
        assert all("peer=127.0.0.1:" in line for line in refused), text
        (wrong_ca,) = [line for line in refused if "federation's CA" in line]
        assert 'subject="CN=coordinator"' in wrong_ca
        assert f'issuer="{other_ca.subject.rfc4514_string()}"' in wrong_ca
        (stale,) = [line for line in refused if "expired" in line]
        assert 'subject="CN=coordinator"' in stale and f"not_after={past:%Y-%m-%d}" in stale

        # The coordinator's calls: status reads the worker's manifest with a
        # computation (CreateValue) and runs it.
        result = fedcompose(
            "status", "--addresses", f"127.0.0.1:{port}", "--tls-dir", str(kits / "coordinator"),
            "--json", timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        text = _wait_for(audit, "method=CreateValue", "method=Compute")
        calls = _lines(text, "call")
        assert calls and all("identity=coordinator" in line for line in calls), text
        assert all("outcome=OK" in line for line in calls), text
        create = [line for line in calls if "method=CreateValue" in line]
        assert all(len(line.split("sha256=")[1].split()[0]) == 64 for line in create)
        assert _lines(text, "connected")
    finally:
        workers_lib.stop_workers(started)


def test_audit_log_is_bounded(tmp_path):
    """Item 2: the log rotates; a flood of lines costs at most (backups + 1) files."""
    from client_worker.audit import AuditLog

    log = AuditLog(tmp_path / "audit.log", max_bytes=4096, backups=2)
    try:
        for i in range(2000):
            log.refused(f"10.0.0.{i % 250}:{1000 + i}", "not TLS (plaintext)")
    finally:
        log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.log", "audit.log.1", "audit.log.2"]
    assert all((tmp_path / f).stat().st_size <= 4096 for f in files)
    assert oct((tmp_path / "audit.log").stat().st_mode & 0o777) == "0o600"


class _Flood:
    """Holds up to `count` connections without a certificate to 127.0.0.1:port,
    from 127.0.0.2 (another host, as seen by the worker): most silent, some
    stalled after part of a TLS ClientHello; each one closed by the worker is
    replaced. Bounded: at most `total` connections, for at most `seconds`."""

    def __init__(self, port: int, count: int = 300, total: int = 5000, seconds: float = 300):
        self.port, self.count, self.total, self.seconds = port, count, total, seconds
        self.opened = 0
        self.closed_by_worker = 0
        self.most_held = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _open(self) -> socket.socket | None:
        s = socket.socket()
        s.setblocking(True)
        s.settimeout(5)
        try:
            s.bind(("127.0.0.2", 0))
            s.connect(("127.0.0.1", self.port))
            if self.opened % 4 == 0:  # a stalled handshake: a ClientHello cut short
                s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(20))
        except OSError:
            s.close()
            return None
        self.opened += 1
        s.setblocking(False)
        return s

    def _run(self) -> None:
        held: list[socket.socket] = []
        end = time.monotonic() + self.seconds
        try:
            while not self._stop.is_set() and time.monotonic() < end:
                alive = []
                for s in held:
                    try:
                        if s.recv(4096) == b"":
                            raise ConnectionResetError
                        alive.append(s)
                    except BlockingIOError:
                        alive.append(s)
                    except OSError:
                        self.closed_by_worker += 1
                        s.close()
                held = alive
                while len(held) < self.count and self.opened < self.total:
                    s = self._open()
                    if s is None:
                        break
                    held.append(s)
                self.most_held = max(self.most_held, len(held))
                self._stop.wait(0.2)
        finally:
            for s in held:
                s.close()

    def __enter__(self) -> _Flood:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)


@pytest.mark.slow
def test_training_goes_on_during_a_connection_flood(shards2, tmp_path):
    """Item 3: a worker whose descriptor limit is 256 (as reported) keeps serving
    the coordinator while 300 connections without a certificate (silent or
    stalled mid-handshake) are held against it from another address, and the
    flood's connections are closed by the handshake limits, each with its line."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    (port,) = free_ports(1)
    kits = tmp_path / "kits"
    provision.provision(kits, provision.parse_sites([f"w0=127.0.0.1:{port}"]))
    started = _start_tls_worker(
        shards2[0], tmp_path / "logs", port, kits / "w0", prefix=["prlimit", "--nofile=256:256"]
    )
    try:
        with _Flood(port) as flood:
            deadline = time.monotonic() + 60
            while flood.most_held < 300 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert flood.most_held >= 300, "the flood did not reach 300 connections"
            result = fedcompose(
                "train", "--addresses", f"127.0.0.1:{port}", "--tls-dir",
                str(kits / "coordinator"), "--rounds", "3", "--eval-every", "0",
                "--clients-per-round", "5", "--run-dir", str(tmp_path / "run"),
                "--connect-timeout", "60", timeout=400,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr[-3000:]
            assert flood.closed_by_worker > 0
        rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        assert len(rows) == 3
        audit = (tmp_path / "logs" / "worker-0.audit.log").read_text()
        assert "evicted: 64 TLS handshakes were pending (the limit)" in audit
        assert "of them from 127.0.0.2" in audit
        assert "identity=coordinator" in audit
    finally:
        workers_lib.stop_workers(started)


def test_units_set_a_descriptor_limit(tmp_path):
    """Item 3: the shipped unit and every unit provision writes set LimitNOFILE."""
    shipped = Path(__file__).resolve().parents[1] / "deploy" / "fedcompose-worker.service"
    assert "\nLimitNOFILE=65536\n" in shipped.read_text()
    provision.provision(tmp_path / "kits", provision.parse_sites(["w0=10.0.0.5"]))
    unit = (tmp_path / "kits" / "w0" / "fedcompose-worker.service").read_text()
    assert "\nLimitNOFILE=65536\n" in unit


@pytest.mark.slow
def test_a_worker_serving_another_sites_kit_on_its_port_is_refused(shards2, tmp_path):
    """Item 4: two workers of one host, each started with the other's kit on its
    own port: their certificates name the same address, so gRPC's check passes;
    the coordinator checks the site its kit records for the address dialled."""
    ports = free_ports(2)
    kits = tmp_path / "kits"
    provision.provision(
        kits, provision.parse_sites([f"w{i}=127.0.0.1:{p}" for i, p in enumerate(ports)])
    )
    swapped = [
        _start_tls_worker(shards2[i], tmp_path / f"logs{i}", ports[i], kits / f"w{1 - i}")[0]
        for i in range(2)
    ]
    try:
        addresses = [f"127.0.0.1:{p}" for p in ports]
        result = fedcompose(
            "status", "--addresses", ",".join(addresses), "--tls-dir", str(kits / "coordinator"),
            "--json", timeout=300,
        )  # fmt: skip
        assert result.returncode == 4, result.stdout + result.stderr[-2000:]
        rows = {r["address"]: r for r in map(json.loads, result.stdout.splitlines())}
        for i, address in enumerate(addresses):
            assert not rows[address]["up"]
            assert (
                f"dialled as worker 'w{i}' (the coordinator's kit records w{i} at {address}), "
                f"but it presents the certificate of worker 'w{1 - i}'"
            ) in rows[address]["error"]
    finally:
        workers_lib.stop_workers(swapped)
    right = [
        _start_tls_worker(shards2[i], tmp_path / f"logs{i}b", ports[i], kits / f"w{i}")[0]
        for i in range(2)
    ]
    try:
        result = fedcompose(
            "status", "--addresses", ",".join(addresses), "--tls-dir", str(kits / "coordinator"),
            "--json", timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    finally:
        workers_lib.stop_workers(right)


def _status(address: str, kit: Path) -> dict:
    result = fedcompose(
        "status", "--addresses", address, "--tls-dir", str(kit), "--json",
        "--connect-timeout", "30", timeout=300,
    )  # fmt: skip
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    (row,) = map(json.loads, result.stdout.splitlines())
    return {"code": result.returncode, **row}


@pytest.mark.slow
def test_revoked_certificates_are_refused_between_hosts(shards2, tmp_path):
    """Item 7: `provision --revoke` writes a revocation list into every kit; a
    worker on another host refuses the revoked coordinator (and says why), the
    re-issued coordinator is served, and a coordinator refuses a revoked worker."""
    with netns.linked_hosts(1, block=5) as (host,):
        kits = tmp_path / "kits"
        provision.provision(kits, provision.parse_sites([f"w0={host.address}"]))
        started = workers_lib.start_workers(
            [shards2[0]], tmp_path / "logs", check="quick",
            prefix=lambda i: host.prefix(), extra_args=lambda i: ["--tls-dir", str(kits / "w0")],
        )  # fmt: skip
        address = f"{host.address}:{started[0].port}"
        try:
            assert _status(address, kits / "coordinator")["up"]
            old_serial = x509.load_pem_x509_certificate(
                (kits / "coordinator" / "cert.pem").read_bytes()
            ).serial_number
            out = fedcompose(
                "provision", "--kits-dir", str(kits), "--revoke", "coordinator", check=True
            ).stdout
            assert f"revoked coordinator's certificate (serial {old_serial:x})" in out
            assert "issued the coordinator's kit" in out
            old_kit = kits / ".revoked" / f"coordinator-{old_serial:x}"
            assert (kits / "w0" / "crl.pem").read_bytes() == (kits / "ca" / "crl.pem").read_bytes()
            # The running worker takes the new list without a restart.
            row = _status(address, old_kit)
            assert row["code"] == 4 and not row["up"]
            assert (
                f"it refused this coordinator: certificate 'coordinator' (serial {old_serial:x}) "
                "was revoked by this federation on"
            ) in row["error"]
            audit = _wait_for(tmp_path / "logs" / "worker-0.audit.log", "certificate revoked")
            assert f"serial={old_serial:x}" in audit
            # The re-issued coordinator is served.
            assert _status(address, kits / "coordinator")["up"]

            # A revoked worker: the coordinator (with the new list) refuses it.
            worker_serial = x509.load_pem_x509_certificate(
                (kits / "w0" / "cert.pem").read_bytes()
            ).serial_number
            fedcompose("provision", "--kits-dir", str(kits), "--revoke", "w0", check=True)
            row = _status(address, kits / "coordinator")
            assert row["code"] == 4 and not row["up"]
            assert (
                f"its certificate (worker 'w0', serial {worker_serial:x}) was revoked on"
            ) in row["error"]
            # A coordinator kit whose list was not signed by the CA is refused at load.
            forged = tmp_path / "forged"
            shutil.copytree(kits / "coordinator", forged)
            other = tmp_path / "other"
            provision.provision(other, {})
            provision.revoke(other, ["coordinator"])
            shutil.copy(other / "ca" / "crl.pem", forged / "crl.pem")
            result = fedcompose("status", "--addresses", address, "--tls-dir", str(forged))
            assert result.returncode == 2
            assert "crl.pem is not signed by this federation's CA" in result.stderr
        finally:
            workers_lib.stop_workers(started)
