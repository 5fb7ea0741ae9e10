"""The worker's public face: a gRPC proxy in front of the loopback-only executor.

TFF's executor service (`worker_binary`) can serve only plaintext on
`[::]:PORT`; fedcompose pins it to loopback (`shared.loopback`). A worker
that other machines must reach serves its public port through this proxy:

* mutual TLS, terminated by the worker's TLS gate (`client_worker.gate`): a
  client must present a certificate signed by the federation's CA and not
  revoked; the gate bounds handshakes and hands each authenticated connection
  to this proxy over a unix socket in a private directory;
* per-call authorization: every call checks the identity of the TLS peer the
  gate saw on that connection, and only the coordinator's may call, so another
  site's certificate (a worker's, say) gets PERMISSION_DENIED on every call,
  not only a handshake; a certificate revoked while connected is refused too;
* an audit line per call (`client_worker.audit`): peer, identity, method,
  size and sha256 of the request (for CreateValue, of the value: the
  computation or the data sent), outcome and time;
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
import hashlib
import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import NoReturn

import grpc

from client_worker import gate as gate_lib
from client_worker.audit import AuditLog
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


class _Forwarder(grpc.GenericRpcHandler):
    def __init__(self, backend: grpc.Channel, allowed: str | None, audit: AuditLog):
        self._backend = backend
        self._allowed = allowed
        self._audit = audit
        self.gate: gate_lib.Gate | None = None
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

    def _deny(
        self,
        context: grpc.ServicerContext,
        method: str,
        who: dict[str, object],
        why: str,
        message: str,
    ) -> NoReturn:
        self.denied += 1
        log.warning("denied %s to %s (%s)", method.rsplit("/", 1)[-1], who["peer"], why)
        self._audit.write("denied", method=method.rsplit("/", 1)[-1], reason=why, **who)
        context.abort(grpc.StatusCode.PERMISSION_DENIED, message)
        raise AssertionError("unreachable: abort raises")

    def _authorize(self, context: grpc.ServicerContext, method: str) -> dict[str, object]:
        """Who is calling, for the audit log; aborts the call if they may not."""
        if self.gate is None:
            return {"peer": context.peer(), "identity": None}
        peer = self.gate.peer(context.peer())
        if peer is None:
            # Only the gate connects to the private socket; anything else is refused.
            who: dict[str, object] = {"peer": context.peer(), "identity": None}
            self._deny(context, method, who, "not through the TLS gate", "not authenticated")
        who = {"peer": peer.address, "identity": peer.identity, "serial": f"{peer.serial:x}"}
        if peer.identity != self._allowed:
            self._deny(
                context,
                method,
                who,
                f"certificate {peer.identity!r} is not the coordinator's {self._allowed!r}",
                f"certificate {peer.identity!r} may not call this worker; only the "
                f"coordinator {self._allowed!r} may",
            )
        revoked = self.gate.revoked(peer.serial)
        if revoked is not None:
            self._deny(
                context,
                method,
                who,
                f"certificate revoked on {revoked:%Y-%m-%d %H:%M} UTC",
                f"certificate {peer.identity!r} (serial {peer.serial:x}) was revoked by this "
                f"federation on {revoked:%Y-%m-%d %H:%M} UTC",
            )
        return who

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if not method.startswith(SERVICE_PREFIX):
            return None  # UNIMPLEMENTED
        forward = self._multicallable(method)

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            who = self._authorize(context, method)
            started = time.monotonic()
            outcome = "OK"
            remaining = context.time_remaining()
            timeout = _NO_DEADLINE if remaining is None else max(remaining, 0.001)
            try:
                return forward(request, timeout=timeout)
            except grpc.RpcError as e:
                code = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN
                details = e.details() if isinstance(e, grpc.Call) else str(e)
                outcome = code.name
                if code == grpc.StatusCode.UNAVAILABLE:
                    details = f"this worker's executor service is unavailable: {details}"
                context.abort(code, details or "")
                raise  # unreachable: abort raises
            finally:
                self._audit.write(
                    "call",
                    method=method.rsplit("/", 1)[-1],
                    **who,
                    bytes=len(request),
                    sha256=hashlib.sha256(request).hexdigest(),
                    outcome=outcome,
                    seconds=f"{time.monotonic() - started:.3f}",
                )

        return grpc.unary_unary_rpc_method_handler(handle)


class Proxy:
    """A running proxy: public `[::]:port` -> `backend_address`."""

    def __init__(
        self,
        server: grpc.Server,
        backend: grpc.Channel,
        forwarder: _Forwarder,
        gate: gate_lib.Gate | None = None,
        private_dir: Path | None = None,
    ):
        self._server = server
        self._backend = backend
        self.forwarder = forwarder
        self.gate = gate
        self._private_dir = private_dir

    def stop(self, grace: float = 2.0) -> None:
        if self.gate is not None:
            self.gate.stop()
        self._server.stop(grace).wait(grace + 1.0)
        self._backend.close()
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)


def start(
    port: int,
    backend_address: str,
    kit: Kit | None,
    *,
    host: str = "[::]",
    threads: int = 16,
    audit: AuditLog | None = None,
    handshake_timeout: float = gate_lib.HANDSHAKE_TIMEOUT,
    max_pending: int = gate_lib.MAX_PENDING,
) -> Proxy:
    """Serves `host:port`, forwarding to the executor at `backend_address`.

    With `kit`: mutual TLS through the gate, only `kit.coordinator` may call.
    Without: plaintext, no authentication (the caller has asked for it explicitly).
    """
    audit = audit or AuditLog(None)
    backend = grpc.insecure_channel(backend_address, options=_OPTIONS)
    forwarder = _Forwarder(backend, kit.coordinator if kit is not None else None, audit)
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
    in_use = ProxyStartError(
        f"cannot serve port {port} (in use by another process, or not allowed); "
        "choose another with --port"
    )
    if kit is None:
        try:
            bound = server.add_insecure_port(f"{host}:{port}")
        except RuntimeError:
            bound = 0
        if bound != port:
            backend.close()
            raise in_use
        server.start()
        return Proxy(server, backend, forwarder)
    # A private directory (0700): no other local user can reach the socket.
    private_dir = Path(tempfile.mkdtemp(prefix="fcgate-"))
    socket_path = private_dir / "proxy.sock"
    gate = None
    try:
        if server.add_insecure_port(f"unix:{socket_path}") != 1:
            raise ProxyStartError(f"cannot serve the proxy's private socket {socket_path}")
        try:
            gate = gate_lib.Gate(
                port,
                kit,
                socket_path,
                audit,
                host=host.strip("[]"),
                handshake_timeout=handshake_timeout,
                max_pending=max_pending,
            )
        except OSError:
            raise in_use from None
        forwarder.gate = gate
        server.start()
        gate.start()
    except BaseException:
        if gate is not None:
            gate.stop()
        server.stop(0)
        backend.close()
        shutil.rmtree(private_dir, ignore_errors=True)
        raise
    return Proxy(server, backend, forwarder, gate, private_dir)
