"""A site's TLS kit: what `fedcompose provision` writes and every side loads.

A kit is a directory::

    ca.pem      the federation's CA certificate (trust anchor)
    cert.pem    this site's certificate, signed by the CA
    key.pem     this site's private key (mode 0600)
    kit.json    who this site is: role, name, the coordinator's name, addresses
    crl.pem     optional: the federation's revocation list (`fedcompose provision
                --revoke`), signed by the CA; both sides refuse a revoked peer

A worker serves mutual TLS with its kit and lets only the coordinator's
identity call (`client_worker.proxy`); the coordinator dials workers with its
kit (`coordinator.executor_client`). Loading checks everything a user can get
wrong (missing or unreadable files, a key readable by others, files or a
directory others can write, a key that does not match its certificate, an
expired certificate, the wrong role's kit) and says so in one line before
anything starts.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from shared.errors import UsageError

if TYPE_CHECKING:
    from cryptography.x509 import Certificate

CA_FILE = "ca.pem"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
KIT_FILE = "kit.json"
CRL_FILE = "crl.pem"
WORKER = "worker"
COORDINATOR = "coordinator"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclasses.dataclass(frozen=True)
class Kit:
    """A loaded kit: the PEM bytes gRPC needs, and who this site is."""

    directory: Path
    role: str
    name: str
    coordinator: str
    """The coordinator's identity (its certificate's common name)."""
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    not_after: datetime.datetime
    addresses: tuple[str, ...] = ()
    info: dict = dataclasses.field(default_factory=dict)
    serial: int = 0
    revocations: Revocations | None = None
    """The kit's `crl.pem`, re-read when it changes (or appears)."""

    def sites_by_address(self) -> dict[str, str]:
        """A coordinator's kit: dial address (lower case) -> the worker site provisioned there."""
        workers = self.info.get("workers") or {}
        found: dict[str, str] = {}
        if isinstance(workers, dict):
            for name, dial in workers.items():
                for address in dial if isinstance(dial, list) else []:
                    found[str(address).lower()] = str(name)
        return found

    @property
    def cert_path(self) -> Path:
        return self.directory / CERT_FILE

    @property
    def key_path(self) -> Path:
        return self.directory / KEY_FILE


class Revocations:
    """A revocation list (X.509 CRL signed by the federation's CA), re-read when
    its file changes, so that a worker takes a new list without a restart."""

    def __init__(self, path: Path, ca_pem: bytes, flag: str = "--tls-dir"):
        self.path = path
        self._ca_pem = ca_pem
        self._flag = flag
        self._stamp: tuple[int, int] | None = None
        self._revoked: dict[int, datetime.datetime] = {}
        self.error = ""
        """Why the last change to the file was not taken (the list before it stays)."""
        self._load(strict=True)

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _load(self, strict: bool) -> None:
        stamp = self._stat()
        if stamp is None:  # no list (yet): nothing is revoked
            self._revoked, self._stamp, self.error = {}, None, ""
            return
        try:
            self._revoked = parse_crl(_read(self.path, "revocation list", self._flag), self._ca_pem)
            self.error = ""
        except UsageError as e:
            if strict:
                raise
            self.error = str(e)
        self._stamp = stamp

    def revoked(self, serial: int) -> datetime.datetime | None:
        """When the certificate with `serial` was revoked; None: it is not."""
        if self._stat() != self._stamp:
            self._load(strict=False)
        return self._revoked.get(serial)

    def __len__(self) -> int:
        return len(self._revoked)


def parse_crl(pem: bytes, ca_pem: bytes, where: str = "--tls-dir") -> dict[int, datetime.datetime]:
    """Serial -> revocation time of a CRL, after checking it is the CA's; one-line errors."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import mlkem, x448, x25519

    try:
        crl = x509.load_pem_x509_crl(pem)
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        raise UsageError(f"{where}: {CRL_FILE} is not a PEM revocation list") from None
    key = ca.public_key()
    # Key-agreement keys cannot sign: such a CA signed no CRL, and checking with one raises.
    agreement_only = (
        x25519.X25519PublicKey,
        x448.X448PublicKey,
        mlkem.MLKEM768PublicKey,
        mlkem.MLKEM1024PublicKey,
    )
    signed = not isinstance(key, agreement_only) and crl.is_signature_valid(key)
    if crl.issuer != ca.subject or not signed:
        raise UsageError(
            f"{where}: {CRL_FILE} is not signed by this federation's CA; copy the {CRL_FILE} "
            "that `fedcompose provision --revoke` wrote"
        )
    return {r.serial_number: r.revocation_date_utc for r in crl}


def _read(path: Path, what: str, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UsageError(
            f"{flag}: {what} {path} is missing; copy the whole kit that `fedcompose "
            "provision` made for this site"
        ) from None
    except IsADirectoryError:
        raise UsageError(f"{flag}: {what} {path} is a directory, not a file") from None
    except PermissionError:
        raise UsageError(
            f"{flag}: {what} {path} cannot be read (permission denied); run as its owner"
        ) from None
    except OSError as e:
        raise UsageError(f"{flag}: {what} {path} cannot be read ({e.strerror or e})") from None


def _check_owned(path: Path, what: str, flag: str) -> None:
    """Refuses a trust anchor that another user can change: whoever can write a
    kit's ca.pem, certificate, description or directory decides whom this site
    trusts or who it is (a kit in a 0777 directory was used as it was)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise UsageError(f"{flag}: {what} {path} cannot be read ({e.strerror or e})") from None
    if st.st_uid not in (os.geteuid(), 0):
        raise UsageError(
            f"{flag}: {what} {path} belongs to another user (uid {st.st_uid}), who could "
            "change whom this site trusts; `chown` it to the user that runs fedcompose"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise UsageError(
            f"{flag}: {what} {path} is writable by others (mode {mode:04o}), who could change "
            f"whom this site trusts; `chmod go-w {path}`"
        )


def _read_kit(path: Path, role: str, flag: str) -> tuple[dict, bytes, bytes, bytes]:
    """The kit's description, CA, certificate and key, read from files only
    this user may change (the key only they may read), for a site of `role`."""
    if not path.is_dir():
        what = "not a directory" if path.exists() else "no such directory"
        raise UsageError(f"{flag} {path}: {what}; give the kit `fedcompose provision` made")
    _check_owned(path, "kit directory", flag)
    raw_info = _read(path / KIT_FILE, "kit description", flag)
    _check_owned(path / KIT_FILE, "kit description", flag)
    try:
        info = json.loads(raw_info)
        kit_role, name, _ = info["role"], info["name"], info["coordinator"]
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{flag}: {path / KIT_FILE} is not a fedcompose kit description") from None
    if kit_role != role:
        raise UsageError(
            f"{flag} {path} is the kit of {kit_role} {name!r}, not a {role}'s kit; give "
            f"this {role}'s own kit"
        )
    ca_pem = _read(path / CA_FILE, "CA certificate", flag)
    cert_pem = _read(path / CERT_FILE, "certificate", flag)
    key_path = path / KEY_FILE
    key_pem = _read(key_path, "private key", flag)
    for file_name, what in ((CA_FILE, "CA certificate"), (CERT_FILE, "certificate")):
        _check_owned(path / file_name, what, flag)
    _check_owned(key_path, "private key", flag)
    mode = stat.S_IMODE(os.stat(key_path).st_mode)
    if mode & 0o077:
        raise UsageError(
            f"{flag}: private key {key_path} is readable by others (mode {mode:04o}); "
            f"`chmod 600 {key_path}`"
        )
    return info, ca_pem, cert_pem, key_pem


def _kit_certificates(
    path: Path, flag: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes
) -> tuple[Certificate, Certificate]:
    """The kit's CA and certificate, checked to belong together and to its key."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    key_path = path / KEY_FILE
    try:
        cas = x509.load_pem_x509_certificates(ca_pem)
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise UsageError(f"{flag}: {path} holds a certificate that is not valid PEM") from None
    if len(cas) != 1:
        # Every certificate in it is trusted: a second CA (another federation's,
        # or a forged one placed first) widens whom this site trusts, and made
        # the diagnosis of a refused handshake blame what was not at fault.
        raise UsageError(
            f"{flag}: {path / CA_FILE} holds {len(cas)} certificates; a kit's ca.pem holds its "
            "federation's CA alone: copy it again from the federation's ca/ca.pem"
        )
    ca = cas[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise UsageError(
            f"{flag}: private key {key_path} is not an unencrypted PEM private key"
        ) from None
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise UsageError(f"{flag}: private key {key_path} does not belong to {path / CERT_FILE}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        why = ""
        if ca.subject == cert.issuer:
            why = (
                f": {CA_FILE} has the name of its issuer ({ca.subject.rfc4514_string()}) but "
                "another key (a CA re-made or forged under that name); copy this site's whole "
                "kit again"
            )
        raise UsageError(
            f"{flag}: {path / CERT_FILE} was not issued by the kit's {CA_FILE}{why}"
        ) from None
    return ca, cert


def _check_usable(path: Path, role: str, flag: str, ca: Certificate, cert: Certificate) -> None:
    """The certificate serves `role`, and it and the CA are valid now."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    # A certificate copied in from another kit: a worker's may only serve, the
    # coordinator's only be a client (`provision.issue`), so it would fail at
    # every handshake; say so here, naming whose it is.
    usage = ExtendedKeyUsageOID.SERVER_AUTH if role == WORKER else ExtendedKeyUsageOID.CLIENT_AUTH
    try:
        usages = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        usages = [usage]
    if usage not in usages:
        raise UsageError(
            f"{flag}: {path / CERT_FILE} ({cert.subject.rfc4514_string()}) is not a {role}'s "
            f"certificate; copy this {role}'s own kit, not files from another"
        )
    now = datetime.datetime.now(datetime.UTC)
    for what, c in (("certificate", cert), ("CA certificate", ca)):
        if c.not_valid_after_utc < now:
            raise UsageError(
                f"{flag}: this site's {what} expired on {c.not_valid_after_utc:%Y-%m-%d %H:%M} "
                "UTC; provision a new kit (`fedcompose provision`)"
            )
        if c.not_valid_before_utc > now:
            raise UsageError(
                f"{flag}: this site's {what} is valid only from "
                f"{c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check this machine's clock"
            )


def load_kit(directory: str | Path, role: str, flag: str = "--tls-dir") -> Kit:
    """The kit in `directory` for a site of `role`, checked; one-line errors."""
    path = Path(directory).expanduser()
    info, ca_pem, cert_pem, key_pem = _read_kit(path, role, flag)
    ca, cert = _kit_certificates(path, flag, ca_pem, cert_pem, key_pem)
    _check_usable(path, role, flag, ca, cert)
    name, coordinator = info["name"], info["coordinator"]
    # Watched even while absent: a list copied in later is taken without a restart.
    revocations = Revocations(path / CRL_FILE, ca_pem, flag)
    when = revocations.revoked(cert.serial_number)
    if when is not None:
        raise UsageError(
            f"{flag}: this site's certificate ({name}, serial {cert.serial_number:x}) was "
            f"revoked on {when:%Y-%m-%d %H:%M} UTC; provision a new kit for it"
        )
    return Kit(
        directory=path,
        role=role,
        name=name,
        coordinator=coordinator,
        ca_pem=ca_pem,
        cert_pem=cert_pem,
        key_pem=key_pem,
        not_after=cert.not_valid_after_utc,
        addresses=tuple(info.get("addresses", ())),
        info=info,
        serial=cert.serial_number,
        revocations=revocations,
    )
