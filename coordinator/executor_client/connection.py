"""Channels to workers, and a direct probe that says why one does not connect.

gRPC reports nearly every connection failure the same way: the channel never
becomes ready, or a call fails UNAVAILABLE ("Socket closed"). A dead worker,
a port that is not a TFF executor service, a worker that speaks TLS to a
plaintext coordinator (or the reverse), and every certificate problem look
alike. When a channel does not connect, `probe` asks the address directly, the
way gRPC would, one layer at a time:

1. DNS and TCP: cannot resolve, refused (nothing listens), no route, no answer;
2. with a TLS kit, Python's `ssl` handshake with the same CA, certificate and
   name check: the precise verification error (unknown CA, expired, name
   mismatch), a plaintext peer, or the worker refusing our certificate;
3. the HTTP/2 connection preface: a gRPC server answers with SETTINGS; a TLS
   server (dialled in plaintext) with a TLS alert; anything else is not a
   gRPC service.

Each outcome is one line naming the likely cause, and says whether waiting
longer could change it (`final`), so that callers fail fast when the answer
is already known.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import ipaddress
import logging
import socket
import ssl
from pathlib import Path

import grpc

from shared.tls import Kit

log = logging.getLogger("fedcompose.coordinator")

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_SETTINGS_FRAME = 0x04

REFUSED = "refused"
NO_ANSWER = "no_answer"
UNREACHABLE = "unreachable"
UNRESOLVED = "unresolved"
WRONG_PROTOCOL = "wrong_protocol"
TLS_EXPECTED = "tls_expected"
PLAINTEXT_PEER = "plaintext_peer"
PEER_CERTIFICATE = "peer_certificate"
OUR_CERTIFICATE = "our_certificate"
OK = "ok"


@dataclasses.dataclass(frozen=True)
class ClientTLS:
    """What the coordinator presents and trusts when it dials a worker."""

    ca_pem: bytes
    cert_path: Path | None
    key_path: Path | None

    @classmethod
    def from_kit(cls, kit: Kit) -> ClientTLS:
        return cls(kit.ca_pem, kit.cert_path, kit.key_path)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_pem,
            private_key=self.key_path.read_bytes() if self.key_path else None,
            certificate_chain=self.cert_path.read_bytes() if self.cert_path else None,
        )

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cadata=self.ca_pem.decode())
        if self.cert_path is not None and self.key_path is not None:
            context.load_cert_chain(self.cert_path, self.key_path)
        context.set_alpn_protocols(["h2"])
        return context


def split_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port)."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        return host, int(rest.lstrip(":"))
    host, _, port = address.rpartition(":")
    return host, int(port)


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def canonical_address(address: str) -> str:
    """`address` with an IP literal host in its canonical form (`[fd00:0::2]:p` ->
    `[fd00::2]:p`); host names as they are.

    gRPC checks a worker's certificate against the dialled host as written, so
    an IPv6 address spelled other than the certificate's canonical IP SAN fails
    the handshake (while Python's `ssl`, which the probe uses, accepts it).
    """
    host, port = split_address(address)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return address
    if ip.version == 4:
        return f"{ip}:{port}"
    return address if ip.ipv4_mapped is not None else f"[{ip}]:{port}"


def open_channel(address: str, tls: ClientTLS | None, options: list) -> grpc.Channel:
    """A channel to `address`: mutual TLS with `tls`, plaintext without."""
    if tls is not None:
        return grpc.secure_channel(
            canonical_address(address), tls.channel_credentials(), options=options
        )
    host, _ = split_address(address)
    if not is_loopback_host(host):
        log.warning(
            "dialling %s in plaintext: anyone on the network path can read and alter what "
            "is sent; give the coordinator's TLS kit (--tls-dir) for workers on other machines",
            address,
        )
    return grpc.insecure_channel(address, options=options)


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    kind: str
    message: str
    final: bool
    """Waiting longer will not change the answer."""

    @property
    def ok(self) -> bool:
        return self.kind == OK


def _connect(host: str, port: int, timeout: float) -> socket.socket | Diagnosis:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return Diagnosis(
            UNRESOLVED, f"cannot resolve host {host!r} ({e.strerror}); check the address", True
        )
    outcomes = []
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)
            return sock
        except ConnectionRefusedError:
            outcomes.append(REFUSED)
        except TimeoutError:
            outcomes.append(NO_ANSWER)
        except OSError as e:
            outcomes.append(
                UNREACHABLE
                if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH)
                else f"{e.strerror or e}"
            )
        sock.close()
    if NO_ANSWER in outcomes:
        return Diagnosis(
            NO_ANSWER,
            f"no answer within {timeout:g}s: the host {host} is down, or a firewall drops "
            f"connections to its port {port}",
            False,
        )
    if UNREACHABLE in outcomes:
        return Diagnosis(
            UNREACHABLE,
            f"no route to {host}: the host is down or the network does not reach it",
            False,
        )
    if outcomes and all(o == REFUSED for o in outcomes):
        return Diagnosis(
            REFUSED,
            f"connection refused: nothing listens on port {port} of {host}; is `fedcompose "
            "worker` running there and is the port right?",
            False,
        )
    return Diagnosis(UNREACHABLE, f"cannot connect to {host}:{port}: {', '.join(outcomes)}", False)


def _http2_answer(sock: socket.socket | ssl.SSLSocket, timeout: float) -> bytes | None:
    """The first bytes the peer answers the HTTP/2 preface with; None: no answer in time."""
    sock.settimeout(timeout)
    sock.sendall(_PREFACE + _EMPTY_SETTINGS)
    try:
        return sock.recv(64)
    except TimeoutError:
        return None


def _classify_plaintext_answer(answer: bytes | None, where: str, timeout: float) -> Diagnosis:
    if answer is None:
        return Diagnosis(
            WRONG_PROTOCOL,
            "accepts connections but does not answer the gRPC (HTTP/2) handshake "
            f"within {timeout:g}s: not a TFF executor service (wrong port?), or it is stuck",
            True,
        )
    if not answer:
        return Diagnosis(
            WRONG_PROTOCOL,
            "closes the connection without answering gRPC: not a TFF executor service "
            "(wrong port?)",
            True,
        )
    if answer[:1] in (b"\x15", b"\x16") and answer[1:2] == b"\x03":
        return Diagnosis(
            TLS_EXPECTED,
            "speaks TLS and this coordinator dialled in plaintext: the worker was "
            "started with a TLS kit; give the coordinator's kit with --tls-dir",
            True,
        )
    if len(answer) >= 9 and answer[3] == _SETTINGS_FRAME:
        return Diagnosis(OK, "answers gRPC (HTTP/2)", False)
    if answer.startswith((b"HTTP/", b"<")):
        first = answer.split(b"\n", 1)[0].strip().decode(errors="replace")[:40]
        return Diagnosis(
            WRONG_PROTOCOL,
            f"answers like a web server ({first!r}), not gRPC: not a TFF executor service "
            "(wrong port?)",
            True,
        )
    return Diagnosis(
        WRONG_PROTOCOL,
        f"answers something other than gRPC ({answer[:24]!r}): not a TFF executor "
        "service (wrong port?)",
        True,
    )


def _peer_certificate(host: str, port: int, timeout: float):
    """The peer's certificate, fetched without verifying it (to describe what is wrong)."""
    from cryptography import x509

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=None) as s,
        ):
            der = s.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der) if der else None
    except (OSError, ValueError):
        return None


def _names(cert) -> str:
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "no address"
    names = [str(n) for n in san.get_values_for_type(x509.IPAddress)]
    names += san.get_values_for_type(x509.DNSName)
    return ", ".join(names) or "no address"


def _when(moment: datetime.datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC"


def _ca_certificates(ca_pem: bytes) -> list:
    """Every certificate in a PEM bundle ([] if it cannot be read)."""
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        return []


def _signed_by(cert, ca) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _same_name_other_key(cert, ca_pem: bytes) -> bool:
    """Whether `ca_pem` holds a CA with the name of `cert`'s issuer, and none of
    that name signed it."""
    named = [ca for ca in _ca_certificates(ca_pem) if ca.subject == cert.issuer]
    return bool(named) and not any(_signed_by(cert, ca) for ca in named)


def _describe_verify_error(
    e: ssl.SSLCertVerificationError, host: str, port: int, timeout: float, ca_pem: bytes
):
    code = e.verify_code
    cert = _peer_certificate(host, port, timeout)
    if code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
        date = f" on {_when(cert.not_valid_after_utc)}" if cert is not None else ""
        return f"its certificate expired{date}: issue the worker a new kit (`fedcompose provision`)"
    if code == 9:  # X509_V_ERR_CERT_NOT_YET_VALID
        date = f" before {_when(cert.not_valid_before_utc)}" if cert is not None else ""
        return f"its certificate is not valid{date}: check the clocks of both machines"
    if code in (62, 64):  # hostname / IP address mismatch
        names = _names(cert) if cert is not None else "other addresses"
        return (
            f"its certificate names {names}, not {host}, the address dialled: dial "
            "it at an address its kit names, or provision its kit with this address"
        )
    if code in (2, 7, 18, 19, 20, 21, 27, 30):  # issuer unknown / bad signature / untrusted
        if cert is not None and _same_name_other_key(cert, ca_pem):
            # Not "another federation": a CA of the very name this kit trusts
            # signed it, with another key (OpenSSL: certificate signature failure).
            return (
                f"its certificate names the issuer {cert.issuer.rfc4514_string()}, as the CA "
                "of the coordinator's kit does, but was not signed with that CA's key: one "
                "of the two kits comes from a CA re-made (or forged) under the same name; "
                "compare both kits' ca.pem with the federation's ca/ca.pem"
            )
        if code == 7:
            return (
                "its certificate's signature does not verify with the CA that issued it: "
                "the certificate was altered or forged; issue the worker a new kit"
            )
        issuer = ""
        if cert is not None:
            issuer = f" (issuer: {cert.issuer.rfc4514_string()})"
        return (
            f"its certificate is not signed by the CA of the coordinator's kit{issuer}: "
            "the worker's kit is from another federation, or this coordinator's is"
        )
    if code == 26:  # X509_V_ERR_INVALID_PURPOSE: no serverAuth (provision.issue)
        subject = f" ({cert.subject.rfc4514_string()})" if cert is not None else ""
        return (
            f"its certificate{subject} may not serve: it is a client (coordinator) "
            "certificate, not a worker's; start the worker with its own kit"
        )
    return f"its certificate failed verification: {e.verify_message}"


_REFUSED_OUR_CERT = {
    "UNKNOWN_CA": "not signed by the CA it trusts (the coordinator's kit is from another "
    "federation?)",
    "CERTIFICATE_EXPIRED": "it has expired; provision a new coordinator kit",
    "UNSUPPORTED_CERTIFICATE": "it is not a client (coordinator) certificate; a worker's "
    "kit used as the coordinator's?",
    "CERTIFICATE_REQUIRED": "none was presented; give the coordinator's kit with --tls-dir",
    "BAD_CERTIFICATE": "it was rejected as a bad certificate",
    "CERTIFICATE_REVOKED": "it was revoked",
    "DECRYPT_ERROR": "its signature did not verify",
    "ACCESS_DENIED": "access denied",
}
_PLAINTEXT_REASONS = (
    "WRONG_VERSION_NUMBER",
    "RECORD_LAYER_FAILURE",
    "PACKET_LENGTH_TOO_LONG",
    "HTTP_REQUEST",
    "UNEXPECTED_RECORD",
    "RECORD_TOO_LARGE",
)


def _describe_ssl_error(e: ssl.SSLError, where: str) -> Diagnosis:
    reason = (e.reason or "").upper()
    for key, why in _REFUSED_OUR_CERT.items():
        if key in reason:
            return Diagnosis(
                OUR_CERTIFICATE, f"it refused this coordinator's certificate: {why}", True
            )
    if any(key in reason for key in _PLAINTEXT_REASONS):
        return Diagnosis(
            PLAINTEXT_PEER,
            "speaks plaintext, not TLS: the worker was started without a TLS kit "
            "(loopback only) or with --insecure-plaintext-network; start it with --tls-dir",
            True,
        )
    if "HANDSHAKE_FAILURE" in reason:
        return Diagnosis(
            OUR_CERTIFICATE,
            "refused the TLS handshake (no client certificate, or none it accepts); "
            "give the coordinator's kit with --tls-dir",
            True,
        )
    return Diagnosis(OUR_CERTIFICATE, f"TLS with {where} failed: {e.reason or e}", True)


def _probe_tls(sock: socket.socket, host: str, port: int, tls: ClientTLS, timeout: float):
    where = f"{host}:{port}"
    try:
        context = tls.ssl_context()
    except (OSError, ssl.SSLError) as e:
        return Diagnosis(OUR_CERTIFICATE, f"the coordinator's kit cannot be used: {e}", True)
    peer_der = None
    try:
        with context.wrap_socket(sock, server_hostname=host) as s:
            peer_der = s.getpeercert(binary_form=True)
            answer = _http2_answer(s, timeout)
    except ssl.SSLCertVerificationError as e:
        return Diagnosis(
            PEER_CERTIFICATE, _describe_verify_error(e, host, port, timeout, tls.ca_pem), True
        )
    except ssl.SSLError as e:
        return _describe_ssl_error(e, where)
    except TimeoutError:
        return Diagnosis(
            WRONG_PROTOCOL,
            "accepts connections but does not answer the TLS handshake within "
            f"{timeout:g}s: not a fedcompose worker with a TLS kit (wrong port?), or it is stuck",
            True,
        )
    except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError, EOFError):
        return Diagnosis(
            PLAINTEXT_PEER,
            "closed the connection during the TLS handshake: it does not speak TLS "
            "(a plaintext worker?), or it rejected this coordinator",
            True,
        )
    if answer is None:
        return Diagnosis(
            WRONG_PROTOCOL,
            f"completed TLS but does not answer gRPC within {timeout:g}s; it is stuck",
            False,
        )
    if not answer:
        # gRPC's TLS server hangs up without an alert when it rejects a client
        # certificate, and the worker may log nothing about it (it said "see the
        # worker's log" of an empty log). Its certificate verified with our CA
        # bundle: what is wrong with ours is told from here, from both
        # certificates, or not claimed.
        peer = _load_der(peer_der)
        why = own_certificate_problem(tls, peer) or (
            "it closed the connection after the TLS handshake without giving a reason; this "
            "coordinator's certificate is valid and issued by "
            + ("the CA that issued the worker's" if peer is not None else "its kit's CA")
            + ", so the cause is on the worker's side (its ca.pem, a revoked certificate, or "
            "a limit on connections)"
        )
        return Diagnosis(OUR_CERTIFICATE, f"it refused the TLS connection: {why}", True)
    if len(answer) >= 9 and answer[3] == _SETTINGS_FRAME:
        return Diagnosis(OK, "answers gRPC over mutual TLS", False)
    return Diagnosis(
        WRONG_PROTOCOL,
        f"answers TLS but not gRPC ({answer[:24]!r}): not a fedcompose worker",
        True,
    )


def _load_der(der: bytes | None):
    from cryptography import x509

    try:
        return x509.load_der_x509_certificate(der) if der else None
    except ValueError:
        return None


def own_certificate_problem(tls: ClientTLS, peer=None) -> str | None:
    """Why a worker would refuse our certificate, if we can tell: from our
    certificate, our CA bundle and (`peer`) the worker's certificate, which
    verified with that bundle."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    if tls.cert_path is None:
        return "this coordinator presented no certificate; give the coordinator's kit"
    try:
        cert = x509.load_pem_x509_certificate(tls.cert_path.read_bytes())
    except (OSError, ValueError):
        return None
    cas = _ca_certificates(tls.ca_pem)
    if not cas:
        return None
    now = datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc < now:
        return (
            f"this coordinator's certificate expired on {_when(cert.not_valid_after_utc)}; "
            "provision a new coordinator kit"
        )
    if cert.not_valid_before_utc > now:
        return "this coordinator's certificate is not valid yet; check the clocks"
    ours = next((ca for ca in cas if _signed_by(cert, ca)), None)
    if ours is None:
        return (
            f"this coordinator's certificate (issuer: {cert.issuer.rfc4514_string()}) is not "
            "signed by any CA in its own kit's ca.pem; copy the coordinator's whole kit again"
        )
    if peer is not None and not _signed_by(peer, ours):
        # Our bundle trusts the worker's CA as well as our own (a ca.pem holding
        # two CAs), but the worker trusts only its own.
        return (
            f"this coordinator's certificate is issued by {ours.subject.rfc4514_string()} and "
            f"the worker's by {peer.issuer.rfc4514_string()}: the coordinator's ca.pem holds "
            f"{len(cas)} CA certificates and trusts the worker, but the worker does not trust "
            "this coordinator's CA; use the coordinator kit of the worker's federation"
        )
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        return (
            f"the certificate presented ({cert.subject.rfc4514_string()}) is not a client "
            "certificate: a worker's kit used as the coordinator's?"
        )
    return None


def probe(address: str, tls: ClientTLS | None, timeout: float = 3.0) -> Diagnosis:
    """Why `address` does (not) serve gRPC to this coordinator, as gRPC would dial it."""
    host, port = split_address(address)
    connected = _connect(host, port, timeout)
    if isinstance(connected, Diagnosis):
        return connected
    with connected as sock:
        if tls is not None:
            return _probe_tls(sock, host, port, tls, timeout)
        try:
            answer = _http2_answer(sock, timeout)
        except (ConnectionResetError, BrokenPipeError):
            answer = b""
    diagnosis = _classify_plaintext_answer(answer, f"{host}:{port}", timeout)
    if diagnosis.kind == WRONG_PROTOCOL and answer == b"" and _speaks_tls(host, port, timeout):
        # gRPC's TLS server drops a plaintext client without a word.
        return Diagnosis(
            TLS_EXPECTED,
            "speaks TLS and this coordinator dialled in plaintext: the worker was started "
            "with a TLS kit; give the coordinator's kit with --tls-dir",
            True,
        )
    return diagnosis


def _speaks_tls(host: str, port: int, timeout: float) -> bool:
    """Whether the peer answers a TLS ClientHello with a ServerHello."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            raw.settimeout(timeout)
            with context.wrap_socket(raw, server_hostname=None):
                return True
    except ssl.SSLError as e:
        # A handshake the server took part in, then refused (no client certificate).
        return "ALERT" in (e.reason or "").upper()
    except OSError:
        return False


def load_client_tls(tls_dir: str) -> ClientTLS | None:
    """The coordinator's TLS from `--tls-dir` (None: plaintext); one-line errors."""
    if not tls_dir:
        return None
    from shared import tls

    return ClientTLS.from_kit(tls.load_kit(tls_dir, tls.COORDINATOR))
