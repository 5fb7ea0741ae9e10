"""The worker's TLS gate: mutual TLS on the public port, in front of the proxy.

gRPC's own TLS server tells the application nothing about a connection it
refuses, holds a connection that never completes its handshake for 120 s,
and has no revocation check. So a worker with a kit terminates TLS here, with
Python's `ssl`, and only then hands the connection to the gRPC proxy
(`client_worker.proxy`), which listens on a unix socket in a private (0700)
directory that no other local user can reach. The gate:

* refuses, and writes to the audit log, every connection that does not
  complete mutual TLS with a certificate of the federation's CA: plaintext,
  no certificate, another CA, expired, and a certificate on the kit's
  revocation list (`crl.pem`, re-read when it changes), with the peer's
  address, the reason and, where the peer sent one, its certificate's subject,
  issuer and serial. To have the certificate even when it fails verification,
  the gate speaks TLS 1.2, where the client's certificate crosses in the clear
  (TLS 1.3 encrypts it and Python's `ssl` offers no verify callback); the
  cipher suites are ECDHE with AES-GCM or ChaCha20-Poly1305 only;
* bounds what an unauthenticated peer can hold: a handshake must finish
  within `handshake_timeout` seconds, and at most `max_pending` handshakes
  are in progress at once; one more evicts the oldest pending connection of
  the source that holds the most (an IPv4 address, or an IPv6 /64), so a
  flood of silent or stalled connections from elsewhere can neither exhaust
  the descriptors nor evict the coordinator's own handshake, whatever its
  rate;
* tells the proxy who each connection is: it connects to the proxy's socket
  from a socket bound to a name of its own, which gRPC reports as the call's
  peer, and `peer(context.peer())` maps it back to the TLS peer's address and
  certificate. A call on a connection the gate did not make has no identity.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import itertools
import logging
import os
import socket
import ssl
import threading
from pathlib import Path

from client_worker.audit import AuditLog
from shared.tls import Kit

log = logging.getLogger("fedcompose.worker")

HANDSHAKE_TIMEOUT = 10.0
MAX_PENDING = 64
_CHUNK = 256 * 1024
_CAPTURE_LIMIT = 64 * 1024
_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
# HTTP/2 GOAWAY, INADEQUATE_SECURITY: how a refusal after the handshake is told
# to the peer (gRPC has no other way to carry a reason on a connection).
_GOAWAY = 0x07
_INADEQUATE_SECURITY = 0x0C


@dataclasses.dataclass(frozen=True)
class Peer:
    """A connection that completed mutual TLS."""

    address: str
    identity: str
    """The certificate's common name (the site's name)."""
    subject: str
    issuer: str
    serial: int


class _Refused(Exception):
    def __init__(self, reason: str, certificate: bytes | None = None):
        super().__init__(reason)
        self.reason = reason
        self.certificate = certificate


class _ClientCertificate:
    """The client's certificate, read from the (TLS 1.2, cleartext) handshake bytes."""

    def __init__(self) -> None:
        self._records = b""
        self._messages = b""
        self._done = False
        self.der: bytes | None = None

    def feed(self, data: bytes) -> None:
        if self._done:
            return
        self._records += data
        if len(self._records) > _CAPTURE_LIMIT:
            self._done = True
            return
        while len(self._records) >= 5:
            kind, length = self._records[0], int.from_bytes(self._records[3:5], "big")
            if len(self._records) < 5 + length:
                return
            body, self._records = self._records[5 : 5 + length], self._records[5 + length :]
            if kind != 22:  # anything but a handshake record: what follows is encrypted
                self._done = True
                return
            self._messages += body
            while len(self._messages) >= 4:
                kind_hs = self._messages[0]
                size = int.from_bytes(self._messages[1:4], "big")
                if len(self._messages) < 4 + size:
                    break
                message, self._messages = self._messages[4 : 4 + size], self._messages[4 + size :]
                if kind_hs == 11 and len(message) >= 6:  # Certificate: list, then first entry
                    first = int.from_bytes(message[3:6], "big")
                    self.der = message[6 : 6 + first] or None
                    self._done = True
                    return


def describe_certificate(der: bytes | None) -> dict[str, object]:
    """Subject, issuer, serial and validity of a DER certificate, for the audit log."""
    if not der:
        return {}
    from cryptography import x509

    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return {"certificate": "unreadable"}
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": f"{cert.serial_number:x}",
        "not_after": f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
    }


def _common_name(der: bytes) -> tuple[str, str, str, int]:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_der_x509_certificate(der)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(names[0].value) if names else ""
    return cn, cert.subject.rfc4514_string(), cert.issuer.rfc4514_string(), cert.serial_number


def _reason(e: ssl.SSLError) -> str:
    """What an `ssl` handshake failure means, in words."""
    text = (getattr(e, "verify_message", None) or e.reason or str(e)).lower()
    reason = (e.reason or "").upper()
    if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reason or "CERTIFICATE_REQUIRED" in reason:
        return "no client certificate"
    if "expired" in text:
        return "certificate expired"
    if "not yet valid" in text:
        return "certificate not yet valid"
    if "issuer" in text or "self-signed" in text or "self signed" in text:
        return "certificate not signed by this federation's CA"
    if "unsupported certificate purpose" in text:
        return "not a client (coordinator) certificate"
    if any(k in reason for k in ("WRONG_VERSION", "HTTP_REQUEST", "UNKNOWN_PROTOCOL")):
        return "not TLS (plaintext)"
    if "NO_SHARED_CIPHER" in reason or "UNSUPPORTED_PROTOCOL" in reason or "VERSION" in reason:
        return f"no TLS version or cipher in common ({e.reason})"
    return f"TLS handshake failed ({e.reason or e})"


def _goaway(message: str) -> bytes:
    debug = message.encode()[:1000]
    payload = (0).to_bytes(4, "big") + _INADEQUATE_SECURITY.to_bytes(4, "big") + debug
    return len(payload).to_bytes(3, "big") + bytes([_GOAWAY, 0]) + (0).to_bytes(4, "big") + payload


class Gate:
    """Serves `host:port` with mutual TLS and relays each authenticated
    connection to the proxy's unix socket `backend`."""

    def __init__(
        self,
        port: int,
        kit: Kit,
        backend: Path,
        audit: AuditLog,
        *,
        host: str = "::",
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_pending: int = MAX_PENDING,
    ):
        self.port = port
        self._kit = kit
        self._backend = backend
        self._audit = audit
        self.handshake_timeout = handshake_timeout
        self.max_pending = max_pending
        self._context = self._tls_context(kit)
        self._lock = threading.Lock()
        # number -> (socket, why it was closed, source), oldest first
        self._pending: collections.OrderedDict[int, tuple[socket.socket, list[str], str]] = (
            collections.OrderedDict()
        )
        self._peers: dict[str, Peer] = {}
        self._open: set[socket.socket] = set()
        self._ids = itertools.count(1)
        self._stopping = threading.Event()
        self.refused = 0
        self._listener = self._listen(host, port)
        self._thread = threading.Thread(target=self._accept_loop, name="tls-gate", daemon=True)

    @staticmethod
    def _tls_context(kit: Kit) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(_CIPHERS)
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=kit.ca_pem.decode())
        context.load_cert_chain(kit.cert_path, kit.key_path)
        context.set_alpn_protocols(["h2"])
        context.options |= ssl.OP_NO_TICKET | ssl.OP_NO_RENEGOTIATION
        return context

    @staticmethod
    def _listen(host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # Dual stack; SO_REUSEADDR only lets a restart bind past TIME_WAIT
            # (without SO_REUSEPORT a second listener still fails).
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(256)
        except OSError:
            sock.close()
            raise
        return sock

    def start(self) -> Gate:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self._thread.join(5)
        with self._lock:
            sockets = [entry[0] for entry in self._pending.values()] + list(self._open)
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def peer(self, grpc_peer: str) -> Peer | None:
        """The TLS peer behind a call whose `context.peer()` is `grpc_peer`."""
        with self._lock:
            return self._peers.get(grpc_peer)

    def revoked(self, serial: int) -> datetime.datetime | None:
        revocations = self._kit.revocations
        return revocations.revoked(serial) if revocations is not None else None

    # -- accepting ---------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, address = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                self._stopping.wait(0.05)  # EMFILE and friends: the next accept may succeed
                continue
            peer = _format_address(address)
            number = next(self._ids)
            evicted = None
            with self._lock:
                why: list[str] = []
                self._pending[number] = (conn, why, _source(address[0]))
                if len(self._pending) > self.max_pending:
                    evicted = self._evict()
            if evicted is not None:
                try:
                    evicted.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            threading.Thread(
                target=self._serve,
                args=(number, conn, peer, why),
                name="tls-gate-conn",
                daemon=True,
            ).start()

    def _evict(self) -> socket.socket:
        """Takes the oldest pending connection of the source holding the most
        (called with the lock held, when one more than `max_pending` are pending)."""
        held = collections.Counter(entry[2] for entry in self._pending.values())
        source = held.most_common(1)[0][0]
        number = next(n for n, entry in self._pending.items() if entry[2] == source)
        conn, why, _ = self._pending.pop(number)
        why.append(
            f"evicted: {self.max_pending} TLS handshakes were pending (the limit), "
            f"{held[source]} of them from {source}"
        )
        return conn

    def _refuse(self, peer: str, reason: str, certificate: bytes | None) -> None:
        self.refused += 1
        self._audit.refused(peer, reason, **describe_certificate(certificate))

    def _serve(self, number: int, conn: socket.socket, peer: str, why: list[str]) -> None:
        try:
            try:
                obj, incoming, outgoing = self._handshake(conn, why)
            except _Refused as e:
                self._refuse(peer, e.reason, e.certificate)
                return
            finally:
                with self._lock:
                    self._pending.pop(number, None)
            der = obj.getpeercert(binary_form=True)
            assert der is not None  # CERT_REQUIRED: no handshake completes without one
            identity, subject, issuer, serial = _common_name(der)
            revoked = self.revoked(serial)
            if revoked is not None:
                reason = f"certificate revoked on {revoked:%Y-%m-%d %H:%M} UTC"
                self._refuse(peer, reason, der)
                self._send_goaway(
                    obj,
                    outgoing,
                    conn,
                    f"certificate {identity!r} (serial {serial:x}) was revoked by this "
                    f"federation on {revoked:%Y-%m-%d %H:%M} UTC",
                )
                return
            self._relay(
                number, conn, obj, incoming, outgoing, Peer(peer, identity, subject, issuer, serial)
            )
        except Exception as e:  # one connection's failure never ends the gate
            log.debug("TLS gate: connection from %s: %s", peer, e)
        finally:
            conn.close()

    def _handshake(
        self, conn: socket.socket, why: list[str]
    ) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = self._context.wrap_bio(incoming, outgoing, server_side=True)
        capture = _ClientCertificate()
        deadline = _monotonic() + self.handshake_timeout
        first = True
        while True:
            try:
                obj.do_handshake()
                conn.settimeout(None)
                _flush(outgoing, conn)
                return obj, incoming, outgoing
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as e:
                try:
                    conn.settimeout(1.0)
                    _flush(outgoing, conn)  # the alert: the peer learns why
                except OSError:
                    pass
                raise _Refused(_reason(e), capture.der) from None
            remaining = deadline - _monotonic()
            try:
                _flush(outgoing, conn)
                if remaining <= 0:
                    raise TimeoutError
                conn.settimeout(remaining)
                data = conn.recv(_CHUNK)
            except TimeoutError:
                raise _Refused(
                    f"no complete TLS handshake within {self.handshake_timeout:g}s"
                    + (" (silent connection)" if first else " (stalled handshake)"),
                    capture.der,
                ) from None
            except OSError as e:
                raise _Refused(
                    why[0] if why else f"connection failed ({e.strerror or e})"
                ) from None
            if not data:
                default = "closed without a word" if first else "closed during the TLS handshake"
                raise _Refused(why[0] if why else default, capture.der)
            if first and data[0] != 0x16:
                raise _Refused(f"not TLS (plaintext: {data[:16]!r})")
            first = False
            capture.feed(data)
            incoming.write(data)

    def _send_goaway(
        self, obj: ssl.SSLObject, outgoing: ssl.MemoryBIO, conn: socket.socket, message: str
    ) -> None:
        try:
            obj.write(_goaway(message))
            conn.settimeout(2.0)
            _flush(outgoing, conn)
        except (OSError, ssl.SSLError):
            pass

    # -- relaying ----------------------------------------------------------

    def _relay(
        self,
        number: int,
        conn: socket.socket,
        obj: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        peer: Peer,
    ) -> None:
        name = str(self._backend.parent / f"c{number}")
        backend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            backend.bind(name)
            backend.connect(str(self._backend))
        except OSError:
            backend.close()
            raise
        finally:
            try:
                os.unlink(name)
            except OSError:
                pass
        key = f"unix:{name}"
        lock = threading.Lock()
        with self._lock:
            self._peers[key] = peer
            self._open.update((conn, backend))
        self._audit.write(
            "connected", peer=peer.address, identity=peer.identity, serial=f"{peer.serial:x}"
        )
        upstream = threading.Thread(
            target=self._to_backend, args=(conn, backend, obj, incoming, outgoing, lock),
            name="tls-gate-up", daemon=True,
        )  # fmt: skip
        upstream.start()
        try:
            while True:
                data = backend.recv(_CHUNK)
                if not data:
                    break
                with lock:
                    obj.write(data)
                    out = outgoing.read()
                conn.sendall(out)
        except (OSError, ssl.SSLError):
            pass
        finally:
            for s in (conn, backend):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            upstream.join(5)
            with self._lock:
                self._peers.pop(key, None)
                self._open.difference_update((conn, backend))
            backend.close()
            self._audit.write("disconnected", peer=peer.address, identity=peer.identity)

    @staticmethod
    def _to_backend(
        conn: socket.socket,
        backend: socket.socket,
        obj: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        lock: threading.Lock,
    ) -> None:
        try:
            while True:
                data = conn.recv(_CHUNK)
                if not data:
                    break
                chunks = []
                with lock:
                    incoming.write(data)
                    while True:
                        try:
                            chunks.append(obj.read(_CHUNK))
                        except ssl.SSLWantReadError:
                            break
                    out = outgoing.read()
                if out:
                    conn.sendall(out)
                for chunk in chunks:
                    if not chunk:  # close_notify
                        return
                    backend.sendall(chunk)
        except (OSError, ssl.SSLError):
            pass
        finally:
            try:
                backend.shutdown(socket.SHUT_WR)
            except OSError:
                pass


def _monotonic() -> float:
    import time

    return time.monotonic()


def _flush(outgoing: ssl.MemoryBIO, conn: socket.socket) -> None:
    data = outgoing.read()
    if data:
        conn.sendall(data)


def _source(host: str) -> str:
    """Whom a pending connection is counted against: its IPv4 address, or its IPv6 /64."""
    import ipaddress

    ip = ipaddress.ip_address(host.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _format_address(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    host, port = address[0], address[1]
    if host.startswith("::ffff:"):
        host = host[7:]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
