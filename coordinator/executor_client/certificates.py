"""What is wrong with a worker's or the coordinator's certificate, told from the
certificates themselves, for the probe's one-line diagnoses."""

from __future__ import annotations

import datetime
import socket
import ssl
from typing import TYPE_CHECKING

from coordinator.executor_client.connection import ClientTLS

if TYPE_CHECKING:
    from cryptography import x509


def _peer_certificate(
    host: str, port: int, timeout: float, tls: ClientTLS | None = None
) -> x509.Certificate | None:
    """The peer's certificate, fetched without verifying it (to describe what is wrong).

    Presents our own certificate: a worker's TLS gate speaks TLS 1.2, where a
    client without one is refused before the handshake completes."""
    from cryptography import x509

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if tls is not None and tls.cert_path is not None and tls.key_path is not None:
        try:
            context.load_cert_chain(tls.cert_path, tls.key_path)
        except (OSError, ssl.SSLError):
            pass
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=None) as s,
        ):
            der = s.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der) if der else None
    except (OSError, ValueError):
        return None


def _names(cert: x509.Certificate) -> str:
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return "no address"
    names = [str(n) for n in san.get_values_for_type(x509.IPAddress)]
    names += san.get_values_for_type(x509.DNSName)
    return ", ".join(names) or "no address"


def when(moment: datetime.datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC"


def _ca_certificates(ca_pem: bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle ([] if it cannot be read)."""
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        return []


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _same_name_other_key(cert: x509.Certificate, ca_pem: bytes) -> bool:
    """Whether `ca_pem` holds a CA with the name of `cert`'s issuer, and none of
    that name signed it."""
    named = [ca for ca in _ca_certificates(ca_pem) if ca.subject == cert.issuer]
    return bool(named) and not any(_signed_by(cert, ca) for ca in named)


def describe_verify_error(
    e: ssl.SSLCertVerificationError, host: str, port: int, timeout: float, tls: ClientTLS
) -> str:
    code = e.verify_code
    cert = _peer_certificate(host, port, timeout, tls)
    if code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
        date = f" on {when(cert.not_valid_after_utc)}" if cert is not None else ""
        return f"its certificate expired{date}: issue the worker a new kit (`fedcompose provision`)"
    if code == 9:  # X509_V_ERR_CERT_NOT_YET_VALID
        date = f" before {when(cert.not_valid_before_utc)}" if cert is not None else ""
        return f"its certificate is not valid{date}: check the clocks of both machines"
    if code in (62, 64):  # hostname / IP address mismatch
        names = _names(cert) if cert is not None else "other addresses"
        return (
            f"its certificate names {names}, not {host}, the address dialled: dial "
            "it at an address its kit names, or provision its kit with this address"
        )
    if code in (2, 7, 18, 19, 20, 21, 27, 30):  # issuer unknown / bad signature / untrusted
        if cert is not None and _same_name_other_key(cert, tls.ca_pem):
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


def load_der(der: bytes | None) -> x509.Certificate | None:
    from cryptography import x509

    try:
        return x509.load_der_x509_certificate(der) if der else None
    except ValueError:
        return None


def own_certificate_problem(tls: ClientTLS, peer: x509.Certificate | None = None) -> str | None:
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
            f"this coordinator's certificate expired on {when(cert.not_valid_after_utc)}; "
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
    if (peer is not None and not _signed_by(peer, ours)) or (peer is None and len(cas) > 1):
        # Our bundle trusts the worker's CA as well as our own (a ca.pem holding
        # two CAs), but the worker trusts only its own. (A worker's TLS gate
        # refuses during the handshake, before its certificate can be read.)
        theirs = f" and the worker's by {peer.issuer.rfc4514_string()}" if peer else ""
        return (
            f"this coordinator's certificate is issued by {ours.subject.rfc4514_string()}"
            f"{theirs}: the coordinator's ca.pem holds {len(cas)} CA certificates and trusts "
            "the worker, but the worker does not trust this coordinator's CA; use the "
            "coordinator kit of the worker's federation"
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
