"""The image's health check: is this container's fedcompose doing its job?

    python -m deploy.container.healthcheck      (exit 0 healthy, 1 not; one line)

It finds the container's `fedcompose` process in /proc and reads its command
line. A worker is healthy when TFF's executor service (its `worker_binary`
child) answers gRPC on its loopback port, and, with a TLS kit, the worker's
public port presents a certificate that verifies against the kit's CA for
the worker's own name and then asks for the coordinator's (the check has
none to give); without a kit, when the port accepts a connection. Any other
command (the coordinator's `train`, say) is healthy while its process runs.

It imports neither TensorFlow nor TFF (only the standard library, grpc and
`shared.loopback`'s /proc reader): a check that loaded TensorFlow would cost
seconds of CPU and hundreds of MB in every container at every interval.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import sys
from pathlib import Path

TIMEOUT = 5.0
DEFAULT_PORT = 10000


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return found


def find_fedcompose() -> tuple[int, list[str]] | None:
    """The oldest process running the `fedcompose` command: (pid, its arguments)."""
    pids = sorted(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    for pid in pids:
        if pid == os.getpid():
            continue
        argv = _cmdline(pid)
        for i, arg in enumerate(argv[:3]):
            if Path(arg).name == "fedcompose" or arg == "deploy.cli":
                return pid, argv[i + 1 :]
    return None


def _option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _executor_port(worker_pid: int) -> int | None:
    from shared import loopback

    for child in _children(worker_pid):
        if "worker_binary" not in " ".join(_cmdline(child)):
            continue
        try:
            ports = [p for a, p in loopback.listening_addresses(child) if loopback.is_loopback(a)]
        except OSError:
            continue
        if ports:
            return ports[0]
    return None


def _executor_answers(port: int) -> bool:
    import grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()


def _tls_handshake(port: int, kit_dir: Path) -> str | None:
    """None if the worker's port completes a verified TLS handshake, else why not."""
    try:
        kit = json.loads((kit_dir / "kit.json").read_text())
        name = (kit.get("addresses") or [None])[0]
        context = ssl.create_default_context(cafile=str(kit_dir / "ca.pem"))
    except (OSError, ValueError, ssl.SSLError) as e:
        return f"cannot read the kit in {kit_dir}: {e}"
    context.set_alpn_protocols(["h2"])
    try:
        ip = socket.inet_pton(socket.AF_INET6 if ":" in str(name) else socket.AF_INET, name)
    except (OSError, TypeError):
        ip = None
    # The certificate names the addresses the coordinator dials; the check dials
    # loopback, so it verifies the chain and the worker's own name, not the route.
    context.check_hostname = ip is None and name is not None
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
            context.wrap_socket(raw, server_hostname=name if ip is None else None) as tls,
        ):
            if tls.selected_alpn_protocol() != "h2":
                return f"port {port} answered TLS without HTTP/2"
    except ssl.SSLCertVerificationError as e:
        return f"TLS handshake on port {port} failed: {e}"
    except ssl.SSLError as e:
        # The worker's TLS gate (TLS 1.2) demands a coordinator's certificate,
        # which the check has not, and says so with this alert. The alert comes
        # after our side verified the worker's certificate against the kit's CA
        # (a failure there is raised above), so the gate is up and is who it
        # should be.
        if "HANDSHAKE_FAILURE" in (e.reason or "") or "CERTIFICATE_REQUIRED" in (e.reason or ""):
            return None
        return f"TLS handshake on port {port} failed: {e}"
    except OSError as e:
        return f"TLS handshake on port {port} failed: {e}"
    return None


def check() -> tuple[bool, str]:
    found = find_fedcompose()
    if found is None:
        return False, "no fedcompose process runs in this container"
    pid, args = found
    command = next((a for a in args if not a.startswith("-")), "?")
    if command != "worker":
        return True, f"fedcompose {command} runs (pid {pid})"
    port = int(_option(args, "--port") or DEFAULT_PORT)
    executor = _executor_port(pid)
    if executor is None:
        return False, f"worker pid {pid}: its executor service does not listen (yet)"
    if not _executor_answers(executor):
        return False, f"worker pid {pid}: its executor service on port {executor} does not answer"
    tls_dir = _option(args, "--tls-dir")
    if tls_dir:
        problem = _tls_handshake(port, Path(tls_dir))
        if problem:
            return False, f"worker pid {pid}: {problem}"
        return True, f"worker serves mutual TLS on port {port}, executor answers on {executor}"
    if executor != port:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
        except OSError as e:
            return False, f"worker pid {pid}: port {port} refuses connections ({e})"
    return True, f"worker serves port {port}, executor answers on {executor}"


def main() -> int:
    healthy, line = check()
    print(("healthy: " if healthy else "unhealthy: ") + line)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
