"""Channels to workers: the coordinator's TLS, worker addresses, and the
channel itself (mutual TLS, or plaintext with a warning off loopback).

Why a channel does not connect is told by `probe` (probe.py)."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import ssl
import threading
from pathlib import Path

import grpc

from shared.tls import Kit, Revocations

log = logging.getLogger("fedcompose.coordinator")


@dataclasses.dataclass(frozen=True)
class ClientTLS:
    """What the coordinator presents and trusts when it dials a worker."""

    ca_pem: bytes
    cert_path: Path | None
    key_path: Path | None
    sites: dict[str, str] = dataclasses.field(default_factory=dict)
    """Dial address (lower case) -> the worker site provisioned there: a worker
    answering at that address must present that site's certificate."""
    revocations: Revocations | None = None

    @classmethod
    def from_kit(cls, kit: Kit) -> ClientTLS:
        return cls(kit.ca_pem, kit.cert_path, kit.key_path, kit.sites_by_address(), kit.revocations)

    @property
    def checks_peer(self) -> bool:
        """Whether a connection needs our own look at the worker's certificate
        (gRPC checks only the CA and the address)."""
        return bool(self.sites) or (self.revocations is not None and len(self.revocations) > 0)

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


_plaintext_warned: set[str] = set()
_plaintext_lock = threading.Lock()


def _first_plaintext_dial(address: str) -> bool:
    """Whether this process dials `address` in plaintext for the first time: the
    warning is said once per worker, not on every probe and reconnection."""
    with _plaintext_lock:
        first = address not in _plaintext_warned
        _plaintext_warned.add(address)
        return first


def open_channel(address: str, tls: ClientTLS | None, options: list) -> grpc.Channel:
    """A channel to `address`: mutual TLS with `tls`, plaintext without."""
    if tls is not None:
        return grpc.secure_channel(
            canonical_address(address), tls.channel_credentials(), options=options
        )
    host, _ = split_address(address)
    if not is_loopback_host(host) and _first_plaintext_dial(address):
        log.warning(
            "dialling %s in plaintext: anyone on the network path can read and alter what "
            "is sent; give the coordinator's TLS kit (--tls-dir) for workers on other machines",
            address,
        )
    return grpc.insecure_channel(address, options=options)


def load_client_tls(tls_dir: str) -> ClientTLS | None:
    """The coordinator's TLS from `--tls-dir` (None: plaintext); one-line errors."""
    if not tls_dir:
        return None
    from shared import tls

    return ClientTLS.from_kit(tls.load_kit(tls_dir, tls.COORDINATOR))
