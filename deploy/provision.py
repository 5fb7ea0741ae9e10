"""`fedcompose provision`: a federation's CA and one TLS kit per site.

Writes, under --kits-dir::

    ca/              the CA's key and certificate: stays on the provisioning machine
    coordinator/     the coordinator's kit (key, certificate, CA certificate, kit.json,
                     commands.txt with ready `status` / `train` command lines)
    <worker name>/   one kit per worker: key (0600), a certificate naming every
                     address the worker is dialled at, the CA certificate, kit.json,
                     commands.txt (a ready `fedcompose worker` line) and a systemd unit

Certificates come from the `cryptography` package (ECDSA P-256, SHA-256).
Re-running never replaces the CA: it adds the sites that are new, keeps the
ones that exist unchanged, and refuses a site whose addresses changed (remove
its directory to re-issue it), a second coordinator identity (workers accept
exactly one) and two workers dialled at one address and port. The
coordinator's kit.json and commands list every worker provisioned so far.

`--revoke NAME,...` adds sites' certificates to the federation's revocation
list (`ca/crl.pem`, an X.509 CRL signed by the CA), copies that list into
every kit (`crl.pem`), and moves the revoked kits aside to `.revoked/`, so
that the name can be issued again. Workers and the coordinator refuse a
revoked peer (`shared.tls.Revocations`).
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import json
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any

from shared import config as config_lib
from shared import files, tls
from shared.errors import UsageError

DESCRIPTION = (
    "Create a federation's certificate authority and a TLS kit per site under --kits-dir: "
    "for each worker named in --sites (NAME=ADDRESS[:PORT], repeat a name for more "
    "addresses) its key, a certificate naming the addresses the coordinator dials it at, "
    "the CA certificate, a ready command line and a systemd unit; for the coordinator its "
    "key and certificate. Copy each kit to its machine; the CA key stays here. Re-running "
    "adds new sites with the existing CA and never replaces it."
)

CA_DIR = "ca"
CA_KEY = "ca.key"
DEFAULT_PORT = 10000
KIT_INSTALL_ROOT = "/etc/fedcompose"
"""Where the generated command lines and units expect a kit to be copied."""
CA_VALID_DAYS = 3650
LOCK_FILE = ".provision.lock"
REVOKED_DIR = ".revoked"
NOFILE_LIMIT = 65536
"""The kit's unit's descriptor limit: connections a flood opens cost descriptors."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_private(path: Path, data: bytes) -> None:
    """Creates `path` with mode 0600 from the start (never briefly readable by others)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


PUBLIC_MODE = 0o644
"""Certificates, kit descriptions and instructions: readable, writable by the
owner only, whatever the umask (under `umask 000` they were world-writable, and
whoever can write a kit's ca.pem decides whom that site trusts)."""


def _write_public(path: Path, data: bytes | str) -> None:
    """A new file at mode 0644 or tighter (the umask can only take bits away)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PUBLIC_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def _replace_public(path: Path, data: str) -> None:
    """`_write_public`, replacing `path` atomically."""
    with files.atomic_target(path) as tmp:
        tmp.unlink(missing_ok=True)
        _write_public(tmp, data)


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def new_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def make_ca(common_name: str, valid_days: int = CA_VALID_DAYS):
    """A self-signed CA: (key, certificate)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(
    ca_key,
    ca_cert,
    common_name: str,
    role: str,
    hosts: list[str] = (),  # type: ignore[assignment]
    *,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    valid_days: int = 365,
):
    """A site certificate: (key, certificate).

    A worker's names every host it is dialled at (IP SANs for addresses, DNS
    SANs for names) and may only serve (serverAuth); the coordinator's may
    only be a client (clientAuth), so neither can stand in for the other.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = new_key()
    now = _now()
    not_before = not_before or now - datetime.timedelta(minutes=5)
    not_after = not_after or now + datetime.timedelta(days=valid_days)
    usage = (
        ExtendedKeyUsageOID.SERVER_AUTH if role == tls.WORKER else ExtendedKeyUsageOID.CLIENT_AUTH
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def write_kit(
    directory: Path,
    *,
    ca_cert,
    key,
    cert,
    info: dict,
    extra_files: dict[str, str] | None = None,
) -> None:
    """Writes a kit into a fresh `directory` (made whole, then renamed into place)."""
    tmp = directory.with_name(f".{directory.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir(mode=0o700)
    try:
        _write_public(tmp / tls.CA_FILE, _cert_pem(ca_cert))
        _write_public(tmp / tls.CERT_FILE, _cert_pem(cert))
        _write_private(tmp / tls.KEY_FILE, _key_pem(key))
        _write_public(tmp / tls.KIT_FILE, json.dumps(info, indent=1) + "\n")
        for name, text in (extra_files or {}).items():
            _write_public(tmp / name, text)
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def parse_sites(entries: list[str]) -> dict[str, tuple[list[str], int]]:
    """`NAME=HOST[:PORT]` entries -> {name: ([hosts], port)}, checked."""
    sites: dict[str, tuple[list[str], int | None]] = {}
    for entry in entries:
        name, sep, address = entry.partition("=")
        name, address = name.strip(), address.strip()
        if not sep or not name or not address:
            raise UsageError(f"--sites: {entry!r} is not NAME=ADDRESS[:PORT]")
        if not tls.NAME_PATTERN.match(name):
            raise UsageError(
                f"--sites: site name {name!r} must be letters, digits, '.', '_' or '-'"
            )
        host, port = _split_host_port(address, entry)
        hosts, known_port = sites.get(name, ([], None))
        if port is not None and known_port is not None and port != known_port:
            raise UsageError(
                f"--sites: {name} is given ports {known_port} and {port}; a worker serves one port"
            )
        if host not in hosts:
            hosts.append(host)
        sites[name] = (hosts, port if port is not None else known_port)
    parsed = {name: (hosts, port or DEFAULT_PORT) for name, (hosts, port) in sites.items()}
    check_distinct_endpoints(parsed)
    return parsed


def check_distinct_endpoints(
    sites: dict[str, tuple[list[str], int]], known: dict[str, list[str]] | None = None
) -> None:
    """Refuses two workers dialled at one address and port: the coordinator would
    reach the same process twice (or the second worker could not start at all)."""
    owner: dict[str, str] = {}
    for name, dial in (known or {}).items():
        for address in dial:
            owner.setdefault(address.lower(), name)
    for name, (hosts, port) in sorted(sites.items()):
        for host in hosts:
            address = dial_address(host, port).lower()
            other = owner.setdefault(address, name)
            if other != name:
                raise UsageError(
                    f"--sites: {other} and {name} would both be dialled at "
                    f"{dial_address(host, port)}; give each worker its own address or port"
                )


_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def _split_host_port(address: str, entry: str) -> tuple[str, int | None]:
    host, port_text = address, ""
    if address.startswith("["):
        host, bracket, rest = address[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise UsageError(f"--sites: {entry!r} is not NAME=[IPV6]:PORT")
        port_text = rest[1:]
        if rest and not port_text:
            raise UsageError(f"--sites: {entry!r} has an empty port")
    elif address.count(":") == 1:
        host, port_text = address.split(":")
        if not port_text:
            raise UsageError(f"--sites: {entry!r} has an empty port")
    port = None
    if port_text:
        if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
            raise UsageError(f"--sites: {entry!r} has an invalid port")
        port = int(port_text)
    return _check_host(host, entry, bracketed=address.startswith("[")), port


def _check_host(host: str, entry: str, *, bracketed: bool) -> str:
    """`host` if a certificate can name it and the coordinator can dial it: an IP
    address (not a wildcard, multicast or scoped one) or a DNS host name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        if "%" in host:
            raise UsageError(
                f"--sites: {entry!r}: a certificate cannot name a scoped address ({host}); "
                "give a global or unique-local address, or a host name"
            )
        if ip.is_unspecified or ip.is_multicast:
            raise UsageError(
                f"--sites: {entry!r}: {host} is not an address a worker can be dialled at; "
                "give the worker machine's own address"
            )
        return str(ip)  # canonical, as certificates and gRPC's name check write it
    labels = host.rstrip(".").split(".") if host.isascii() else []
    if (
        bracketed
        or not labels
        or len(host) > 253
        or not all(_LABEL.match(label) for label in labels)
        or labels[-1].isdigit()  # 999.1.1.1, 10.0.1: a mistyped address, not a name
    ):
        raise UsageError(
            f"--sites: {entry!r}: {host!r} is neither an IP address nor a host name "
            "(ASCII letters, digits and '-' in dot-separated labels; IDNs in punycode, xn--...)"
        )
    return host


def dial_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _worker_files(name: str, port: int, kit_dir: str) -> dict[str, str]:
    command = (
        f"fedcompose worker --shard /var/lib/fedcompose/shard --port {port} "
        f"--tls-dir {kit_dir} --log-file /var/log/fedcompose/worker.log"
    )
    unit = f"""# fedcompose worker {name}, serving mutual TLS on port {port}.
# The worker runs the TensorFlow graphs the coordinator sends, which can read
# and write files: it runs as a user of its own, never as root. Copy this kit to
# {kit_dir}, the shard to /var/lib/fedcompose/shard, fedcompose to
# /opt/fedcompose, then:
#   useradd --system --no-create-home fedcompose
#   chown -R fedcompose: {kit_dir} && chmod 600 {kit_dir}/key.pem
#   cp {kit_dir}/fedcompose-worker.service /etc/systemd/system/
#   systemctl daemon-reload && systemctl enable --now fedcompose-worker
[Unit]
Description=fedcompose client worker {name} (TFF executor service behind mutual TLS)
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User=fedcompose
Group=fedcompose
NoNewPrivileges=yes
PrivateTmp=yes
LogsDirectory=fedcompose
WorkingDirectory=/opt/fedcompose
# Every connection costs descriptors; the worker bounds unauthenticated ones
# (--max-pending-handshakes), this bounds the rest.
LimitNOFILE={NOFILE_LIMIT}
ExecStart=/opt/fedcompose/.venv/bin/{command}
KillSignal=SIGTERM
TimeoutStopSec=20
Restart=on-failure
RestartSec=5

[Install]
WantedBy=multi-user.target
"""
    commands = (
        f"# Worker {name}: copy this directory to {kit_dir} on its machine, then run\n{command}\n"
    )
    return {"commands.txt": commands, "fedcompose-worker.service": unit}


def _coordinator_commands(workers: dict[str, list[str]], kit_dir: str) -> str:
    addresses = ",".join(a for name in sorted(workers) for a in workers[name][:1])
    if not addresses:
        return "# No workers provisioned yet: `fedcompose provision --sites NAME=ADDRESS`.\n"
    return (
        f"# Coordinator: copy this directory to {kit_dir}, then\n"
        f"fedcompose status --addresses {addresses} --tls-dir {kit_dir}\n"
        f"fedcompose train --addresses {addresses} --tls-dir {kit_dir} --run-dir runs/federation\n"
    )


def _load_ca(ca_dir: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate((ca_dir / tls.CA_FILE).read_bytes())
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(
            f"--kits-dir: the CA in {ca_dir} cannot be read ({getattr(e, 'strerror', None) or e}); "
            "it is never replaced: restore it, or provision a new federation in another directory"
        ) from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise UsageError(
            f"--kits-dir: {ca_dir / CA_KEY} does not belong to {ca_dir / tls.CA_FILE}: kits "
            "signed with it would not verify; restore the CA's own pair"
        )
    mode = stat.S_IMODE(os.stat(ca_dir / CA_KEY).st_mode)
    if mode & 0o077:
        # It can issue any identity, the coordinator's included.
        raise UsageError(
            f"--kits-dir: the CA key {ca_dir / CA_KEY} is readable by others (mode "
            f"{mode:04o}); `chmod 600 {ca_dir / CA_KEY}`, and consider the federation "
            "compromised if others could read it"
        )
    return key, cert


def _read_info(info_path: Path) -> dict:
    """An existing kit's description, or one line saying it is damaged."""
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict):
        raise UsageError(
            f"--kits-dir: {info_path} is missing or not a kit description (damaged?); "
            f"restore it, or remove {info_path.parent} to re-issue that kit"
        )
    return info


def provision(
    kits_dir: Path,
    sites: dict[str, tuple[list[str], int]],
    coordinator_name: str = "coordinator",
    valid_days: int = 365,
) -> list[str]:
    """Creates or extends a federation under `kits_dir`; returns what it did, one line each."""
    if not tls.NAME_PATTERN.match(coordinator_name):
        raise UsageError(f"--coordinator-name {coordinator_name!r}: letters, digits, '.', '_', '-'")
    if coordinator_name in sites or CA_DIR in sites:
        clash = coordinator_name if coordinator_name in sites else CA_DIR
        raise UsageError(f"--sites: {clash!r} is reserved (the coordinator's or the CA's kit)")
    if kits_dir.exists() and not kits_dir.is_dir():  # was only "File exists", exit 1
        raise UsageError(f"--kits-dir {kits_dir} exists and is not a directory; give a directory")
    kits_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    # Two provisions at once would each make a CA (one losing the rename and
    # leaving its key behind) or each rewrite the coordinator's list: one at a time.
    lock = os.open(kits_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _provision_locked(kits_dir, sites, coordinator_name, valid_days)
    finally:
        os.close(lock)


def _provision_locked(
    kits_dir: Path,
    sites: dict[str, tuple[list[str], int]],
    coordinator_name: str,
    valid_days: int,
) -> list[str]:
    done: list[str] = []
    ca_dir = kits_dir / CA_DIR
    coordinator_dir = kits_dir / coordinator_name
    ca_key, ca_cert = _the_ca(kits_dir, ca_dir, done)
    ca_pem = _cert_pem(ca_cert)
    workers = _kits_issued(kits_dir, coordinator_name)
    check_distinct_endpoints(
        {name: site for name, site in sites.items() if name not in workers}, workers
    )
    for name, (hosts, port) in sorted(sites.items()):
        site_dir = kits_dir / name
        dial = [dial_address(h, port) for h in hosts]
        if site_dir.exists():
            _check_kept_worker(site_dir, name, dial, ca_pem)
            done.append(f"kept {name}'s kit in {site_dir}")
            continue
        key, cert = issue(ca_key, ca_cert, name, tls.WORKER, hosts, valid_days=valid_days)
        kit_dir = f"{KIT_INSTALL_ROOT}/{name}"
        write_kit(
            site_dir,
            ca_cert=ca_cert,
            key=key,
            cert=cert,
            info={
                "role": tls.WORKER,
                "name": name,
                "coordinator": coordinator_name,
                "addresses": hosts,
                "port": port,
                "dial": dial,
            },
            extra_files=_worker_files(name, port, kit_dir),
        )
        workers[name] = dial
        done.append(f"issued {name}'s kit in {site_dir} (dialled at {', '.join(dial)})")

    _coordinator_kit(coordinator_dir, coordinator_name, workers, ca_key, ca_cert, valid_days, done)
    _distribute_crl(kits_dir, ca_dir, done)
    return done


def _the_ca(kits_dir: Path, ca_dir: Path, done: list[str]) -> tuple[Any, Any]:
    """The federation's CA: the one in `ca_dir`, or a new one if there are no
    kits it would have to match."""
    if ca_dir.exists():
        ca_key, ca_cert = _load_ca(ca_dir)
        done.append(f"kept the existing CA in {ca_dir}")
    else:
        existing = [p for p in kits_dir.iterdir() if (p / tls.KIT_FILE).exists()]
        if existing:
            raise UsageError(
                f"--kits-dir {kits_dir} holds kits ({existing[0].name}, ...) but no CA in "
                f"{ca_dir}; a new CA would not match them: restore the CA or use another directory"
            )
        from cryptography.x509.oid import NameOID

        ca_key, ca_cert = make_ca(f"fedcompose federation CA {secrets.token_hex(4)}")
        tmp = kits_dir / f".ca.tmp-{secrets.token_hex(4)}"
        tmp.mkdir(mode=0o700)
        try:
            _write_private(tmp / CA_KEY, _key_pem(ca_key))
            _write_public(tmp / tls.CA_FILE, _cert_pem(ca_cert))
            os.rename(tmp, ca_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # never a stray CA key
            raise
        cn = ca_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        done.append(f"created the CA ({cn}) in {ca_dir}: keep ca.key here, never copy it")

    return ca_key, ca_cert


def _kits_issued(kits_dir: Path, coordinator_name: str) -> dict[str, list[str]]:
    """The workers already issued a kit (name -> dial addresses); refuses a
    second coordinator name."""
    workers: dict[str, list[str]] = {}
    for name in sorted(p.name for p in kits_dir.iterdir() if not p.name.startswith(".")):
        info_path = kits_dir / name / tls.KIT_FILE
        if not info_path.is_file():
            continue
        info = _read_info(info_path)
        if info.get("role") == tls.WORKER:
            workers[name] = list(info.get("dial", []))
        elif info.get("role") == tls.COORDINATOR and name != coordinator_name:
            # Workers accept exactly one coordinator identity: a second one would
            # split the federation (old workers refuse it, new ones the first).
            raise UsageError(
                f"--coordinator-name {coordinator_name!r}: this federation's coordinator is "
                f"{name!r} ({kits_dir / name}); re-run with --coordinator-name {name}"
            )
    return workers


def _check_kept_worker(site_dir: Path, name: str, dial: list[str], ca_pem: bytes) -> None:
    """An existing kit may stay only as this worker's, from this CA, at these addresses."""
    info_path = site_dir / tls.KIT_FILE
    info = _read_info(info_path) if info_path.is_file() else {}
    if info.get("role") != tls.WORKER:
        raise UsageError(
            f"--sites: {site_dir} exists but is not a worker's kit; remove it to "
            f"issue {name}'s kit there, or choose another name"
        )
    site_ca = site_dir / tls.CA_FILE
    if site_ca.is_file() and site_ca.read_bytes() != ca_pem:
        raise UsageError(f"--sites: {site_dir} was issued by another CA; remove it to re-issue")
    if info.get("dial") != dial:
        raise UsageError(
            f"--sites: {name} exists with addresses {', '.join(info.get('dial', []))}, "
            f"not {', '.join(dial)}; remove {site_dir} to re-issue it"
        )


def _coordinator_kit(
    coordinator_dir: Path,
    coordinator_name: str,
    workers: dict[str, list[str]],
    ca_key: Any,
    ca_cert: Any,
    valid_days: int,
    done: list[str],
) -> None:
    """Issues the coordinator's kit, or updates the worker list of the one there."""
    coordinator_kit_dir = f"{KIT_INSTALL_ROOT}/{coordinator_name}"
    coordinator_info = {
        "role": tls.COORDINATOR,
        "name": coordinator_name,
        "coordinator": coordinator_name,
        "workers": workers,
    }
    if coordinator_dir.exists():
        info_path = coordinator_dir / tls.KIT_FILE
        old = _read_info(info_path)
        if old.get("role") != tls.COORDINATOR:
            raise UsageError(f"--coordinator-name {coordinator_name!r} names a worker's kit")
        if old.get("workers") != workers:
            _replace_public(info_path, json.dumps(coordinator_info, indent=1) + "\n")
            _replace_public(
                coordinator_dir / "commands.txt",
                _coordinator_commands(workers, coordinator_kit_dir),
            )
            done.append(f"updated the coordinator's worker list in {coordinator_dir}")
        else:
            done.append(f"kept the coordinator's kit in {coordinator_dir}")
    else:
        key, cert = issue(ca_key, ca_cert, coordinator_name, tls.COORDINATOR, valid_days=valid_days)
        write_kit(
            coordinator_dir,
            ca_cert=ca_cert,
            key=key,
            cert=cert,
            info=coordinator_info,
            extra_files={"commands.txt": _coordinator_commands(workers, coordinator_kit_dir)},
        )
        done.append(f"issued the coordinator's kit in {coordinator_dir}")


def _distribute_crl(kits_dir: Path, ca_dir: Path, done: list[str]) -> None:
    """Copies the federation's revocation list into every kit that lacks it or holds an old one."""
    crl = ca_dir / tls.CRL_FILE
    if not crl.is_file():
        return
    data = crl.read_bytes()
    for site in sorted(p for p in kits_dir.iterdir() if not p.name.startswith(".")):
        if site.name == CA_DIR or not (site / tls.KIT_FILE).is_file():
            continue
        target = site / tls.CRL_FILE
        if not target.is_file() or target.read_bytes() != data:
            files.write_atomic(target, data)
            os.chmod(target, 0o644)
            done.append(f"wrote the revocation list into {target}: copy it to its machine")


def _revoked_serials(ca_dir: Path, ca_cert) -> dict[int, datetime.datetime]:
    crl = ca_dir / tls.CRL_FILE
    if not crl.is_file():
        return {}
    return tls.parse_crl(crl.read_bytes(), _cert_pem(ca_cert), where=f"--kits-dir: {ca_dir}")


def revoke(
    kits_dir: Path, names: list[str], coordinator_name: str = "coordinator", valid_days: int = 365
) -> list[str]:
    """Revokes the certificates of the sites `names`; returns what it did, one line each."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    if not (kits_dir / CA_DIR).is_dir():
        raise UsageError(
            f"--kits-dir {kits_dir} holds no federation (no {CA_DIR}/); nothing to revoke"
        )
    lock = os.open(kits_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ca_dir = kits_dir / CA_DIR
        ca_key, ca_cert = _load_ca(ca_dir)
        revoked = _revoked_serials(ca_dir, ca_cert)
        done: list[str] = []
        moved: list[tuple[Path, Path]] = []
        now = _now()
        for name in names:
            site_dir = kits_dir / name
            if name == CA_DIR or not (site_dir / tls.KIT_FILE).is_file():
                raise UsageError(
                    f"--revoke {name}: no kit of that name in {kits_dir}; give the name of a "
                    "provisioned site"
                )
            try:
                cert = x509.load_pem_x509_certificate((site_dir / tls.CERT_FILE).read_bytes())
            except (OSError, ValueError):
                raise UsageError(
                    f"--revoke {name}: {site_dir / tls.CERT_FILE} cannot be read as a certificate"
                ) from None
            revoked.setdefault(cert.serial_number, now)
            aside = kits_dir / REVOKED_DIR / f"{name}-{cert.serial_number:x}"
            moved.append((site_dir, aside))
            done.append(f"revoked {name}'s certificate (serial {cert.serial_number:x})")
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - datetime.timedelta(minutes=5))
            .next_update(ca_cert.not_valid_after_utc)
        )
        for serial, when in sorted(revoked.items()):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
            )
        crl = builder.sign(ca_key, hashes.SHA256())
        from cryptography.hazmat.primitives import serialization

        files.write_atomic(
            ca_dir / tls.CRL_FILE, crl.public_bytes(serialization.Encoding.PEM).decode()
        )
        os.chmod(ca_dir / tls.CRL_FILE, 0o644)
        for site_dir, aside in moved:
            aside.parent.mkdir(mode=0o700, exist_ok=True)
            os.rename(site_dir, aside)
            done.append(f"moved {site_dir.name}'s kit aside to {aside}")
        # The coordinator's list loses revoked workers; a revoked coordinator is issued anew.
        done += _provision_locked(kits_dir, {}, coordinator_name, valid_days)
        return done
    finally:
        os.close(lock)


def run(config: config_lib.RunConfig) -> int:
    p = config.provision
    sites = parse_sites(list(p.sites))
    kits_dir = Path(p.kits_dir).expanduser()
    if p.revoke:
        for line in revoke(kits_dir, list(p.revoke), p.coordinator_name, p.valid_days):
            print(line)
        if not sites:
            return 0
    for line in provision(Path(p.kits_dir).expanduser(), sites, p.coordinator_name, p.valid_days):
        print(line)
    return 0
