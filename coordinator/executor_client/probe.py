"""A direct probe that says why a channel to a worker does not connect.

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
import errno
import socket
import ssl

from coordinator.executor_client import certificates
from coordinator.executor_client.connection import ClientTLS, canonical_address, split_address

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
WRONG_SITE = "wrong_site"
REVOKED = "revoked"
OK = "ok"
_GOAWAY_FRAME = 0x07


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
        answer = sock.recv(64)
        if len(answer) >= 9 and answer[3] == _GOAWAY_FRAME:  # read its reason whole
            want = 9 + int.from_bytes(answer[:3], "big")
            while len(answer) < min(want, 2048):
                more = sock.recv(want - len(answer))
                if not more:
                    break
                answer += more
        return answer
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


def _probe_tls(
    sock: socket.socket, host: str, port: int, tls: ClientTLS, timeout: float
) -> Diagnosis:
    handshake = _tls_handshake(sock, host, port, tls, timeout)
    if isinstance(handshake, Diagnosis):
        return handshake
    peer_der, answer = handshake
    return _classify_tls_answer(answer, peer_der, tls, timeout)


def _tls_handshake(
    sock: socket.socket, host: str, port: int, tls: ClientTLS, timeout: float
) -> Diagnosis | tuple[bytes | None, bytes | None]:
    """The worker's certificate and its answer to the HTTP/2 preface over TLS, or
    why the handshake (or our look at the certificate) failed."""
    where = f"{host}:{port}"
    try:
        context = tls.ssl_context()
    except (OSError, ssl.SSLError) as e:
        return Diagnosis(OUR_CERTIFICATE, f"the coordinator's kit cannot be used: {e}", True)
    peer_der = None
    try:
        with context.wrap_socket(sock, server_hostname=host) as s:
            peer_der = s.getpeercert(binary_form=True)
            refused = _check_peer(peer_der, host, port, tls)
            if refused is not None:
                return refused
            answer = _http2_answer(s, timeout)
    except ssl.SSLCertVerificationError as e:
        return Diagnosis(
            PEER_CERTIFICATE, certificates.describe_verify_error(e, host, port, timeout, tls), True
        )
    except ssl.SSLError as e:
        diagnosis = _describe_ssl_error(e, where)
        if diagnosis.kind == OUR_CERTIFICATE:
            # The worker's alert names the fault; our own look can add the detail.
            why = certificates.own_certificate_problem(tls)
            if why:
                return Diagnosis(
                    OUR_CERTIFICATE, f"it refused this coordinator's certificate: {why}", True
                )
        return diagnosis
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
    return peer_der, answer


def _classify_tls_answer(
    answer: bytes | None, peer_der: bytes | None, tls: ClientTLS, timeout: float
) -> Diagnosis:
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
        peer = certificates.load_der(peer_der)
        why = certificates.own_certificate_problem(tls, peer) or (
            "it closed the connection after the TLS handshake without giving a reason; this "
            "coordinator's certificate is valid and issued by "
            + ("the CA that issued the worker's" if peer is not None else "its kit's CA")
            + ", so the cause is on the worker's side (its ca.pem, a revoked certificate, or "
            "a limit on connections)"
        )
        return Diagnosis(OUR_CERTIFICATE, f"it refused the TLS connection: {why}", True)
    if len(answer) >= 9 and answer[3] == _SETTINGS_FRAME:
        return Diagnosis(OK, "answers gRPC over mutual TLS", False)
    if len(answer) >= 17 and answer[3] == _GOAWAY_FRAME:
        # The worker's TLS gate says why it refuses this coordinator (a revoked certificate).
        said = answer[17 : 9 + int.from_bytes(answer[:3], "big")].decode(errors="replace")
        return Diagnosis(
            OUR_CERTIFICATE, f"it refused this coordinator: {said or 'no reason given'}", True
        )
    return Diagnosis(
        WRONG_PROTOCOL,
        f"answers TLS but not gRPC ({answer[:24]!r}): not a fedcompose worker",
        True,
    )


def _check_peer(der: bytes | None, host: str, port: int, tls: ClientTLS) -> Diagnosis | None:
    """The worker's certificate against what the coordinator's kit says: the site
    provisioned at the address dialled, and the revocation list."""
    if not der or not tls.checks_peer:
        return None
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_der_x509_certificate(der)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    site = str(names[0].value) if names else "(no name)"
    if tls.revocations is not None:
        when = tls.revocations.revoked(cert.serial_number)
        if when is not None:
            return Diagnosis(
                REVOKED,
                f"its certificate (worker {site!r}, serial {cert.serial_number:x}) was revoked "
                f"on {certificates.when(when)} by the federation's revocation list "
                f"({tls.revocations.path}): "
                "it may not take part; provision that worker a new kit",
                True,
            )
    address = canonical_address(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    expected = tls.sites.get(address.lower())
    if expected is not None and site != expected:
        return Diagnosis(
            WRONG_SITE,
            f"dialled as worker {expected!r} (the coordinator's kit records {expected} at "
            f"{address}), but it presents the certificate of worker {site!r}: {site}'s kit is "
            f"served on {expected}'s address; start each worker with its own kit and port",
            True,
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
