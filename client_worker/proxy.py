"""The worker's public face: a gRPC proxy in front of the loopback-only executor.

TFF's executor service (`worker_binary`) can serve only plaintext on
`[::]:PORT`; fedcompose pins it to loopback (`shared.loopback`). A worker
that other machines must reach serves its public port through this proxy:

* mutual TLS (`grpc.ssl_server_credentials(..., require_client_auth=True)`):
  a client must present a certificate signed by the federation's CA;
* per-call authorization: every call checks the peer certificate's identity
  (`context.auth_context()`) and only the coordinator's may call, so another
  site's certificate (a worker's, say) gets PERMISSION_DENIED on every call,
  not only a handshake;
* raw bytes: methods of TFF's `ExecutorGroup` service are forwarded without
  deserializing (no (de)serializers), with the caller's deadline; any other
  method is UNIMPLEMENTED;
* an exclusive port (`grpc.so_reuseport` off), so a second worker on the
  same port fails at start instead of sharing it.

Without a kit it can serve plaintext, which only `fedcompose worker
--insecure-plaintext-network` asks for.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading

import grpc

from shared.errors import FedcomposeError
from shared.tls import Kit

log = logging.getLogger("fedcompose.worker")

SERVICE_PREFIX = "/tensorflow_federated.v0.ExecutorGroup/"
_MAX_MESSAGE_BYTES = 2000 * 1000 * 1000
_NO_DEADLINE = 24 * 3600.0
_OPTIONS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
]


class ProxyStartError(FedcomposeError):
    """The proxy could not serve its public port."""


def peer_identity(context: grpc.ServicerContext) -> str | None:
    """The common name of the TLS peer's certificate, if any."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode(errors="replace") if names else None


class _Forwarder(grpc.GenericRpcHandler):
    def __init__(self, backend: grpc.Channel, allowed: str | None):
        self._backend = backend
        self._allowed = allowed
        self._calls: dict[str, grpc.UnaryUnaryMultiCallable] = {}
        self._lock = threading.Lock()
        self.denied = 0

    def _multicallable(self, method: str) -> grpc.UnaryUnaryMultiCallable:
        with self._lock:
            call = self._calls.get(method)
            if call is None:
                call = self._backend.unary_unary(method)  # bytes in, bytes out
                self._calls[method] = call
            return call

    def _authorize(self, context: grpc.ServicerContext, method: str) -> None:
        if self._allowed is None:
            return
        identity = peer_identity(context)
        if identity != self._allowed:
            self.denied += 1
            log.warning(
                "denied %s to %s (certificate %r is not the coordinator's %r)",
                method.rsplit("/", 1)[-1],
                context.peer(),
                identity,
                self._allowed,
            )
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"certificate {identity!r} may not call this worker; only the "
                f"coordinator {self._allowed!r} may",
            )

    def service(self, handler_call_details):
        method = handler_call_details.method
        if not method.startswith(SERVICE_PREFIX):
            return None  # UNIMPLEMENTED
        forward = self._multicallable(method)

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            self._authorize(context, method)
            remaining = context.time_remaining()
            timeout = _NO_DEADLINE if remaining is None else max(remaining, 0.001)
            try:
                return forward(request, timeout=timeout)
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN
                details = e.details() if isinstance(e, grpc.Call) else str(e)
                if code == grpc.StatusCode.UNAVAILABLE:
                    details = f"this worker's executor service is unavailable: {details}"
                context.abort(code, details or "")
                raise  # unreachable: abort raises

        return grpc.unary_unary_rpc_method_handler(handle)


class Proxy:
    """A running proxy: public `[::]:port` -> `backend_address`."""

    def __init__(self, server: grpc.Server, backend: grpc.Channel, forwarder: _Forwarder):
        self._server = server
        self._backend = backend
        self.forwarder = forwarder

    def stop(self, grace: float = 2.0) -> None:
        self._server.stop(grace).wait(grace + 1.0)
        self._backend.close()


def start(
    port: int,
    backend_address: str,
    kit: Kit | None,
    *,
    host: str = "[::]",
    threads: int = 16,
) -> Proxy:
    """Serves `host:port`, forwarding to the executor at `backend_address`.

    With `kit`: mutual TLS, only `kit.coordinator` may call. Without: plaintext,
    no authentication (the caller has asked for it explicitly).
    """
    backend = grpc.insecure_channel(backend_address, options=_OPTIONS)
    forwarder = _Forwarder(backend, kit.coordinator if kit is not None else None)
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="proxy"),
        handlers=[forwarder],
        options=[
            *_OPTIONS,
            ("grpc.so_reuseport", 0),
            # The coordinator pings every 10 s, also between rounds: allow it.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.http2.max_ping_strikes", 0),
        ],
    )
    address = f"{host}:{port}"
    try:
        if kit is not None:
            credentials = grpc.ssl_server_credentials(
                [(kit.key_pem, kit.cert_pem)],
                root_certificates=kit.ca_pem,
                require_client_auth=True,
            )
            bound = server.add_secure_port(address, credentials)
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound != port:
        backend.close()
        raise ProxyStartError(
            f"cannot serve port {port} (in use by another process, or not allowed); "
            "choose another with --port"
        )
    server.start()
    return Proxy(server, backend, forwarder)
