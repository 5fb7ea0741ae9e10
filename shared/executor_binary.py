"""Locating and starting TFF's C++ executor service (`worker_binary`).

Every `worker_binary` fedcompose starts listens on loopback only and owns its
port (`shared.loopback`); anything that must be reached from other hosts goes
through the worker's TLS proxy (`client_worker.proxy`).
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
from pathlib import Path
from typing import BinaryIO

from shared import loopback, processes

BINARY_NAME = "worker_binary"
DEFAULT_MAX_MESSAGE_MB = 2000


def binary_path() -> Path:
    """The executor service shipped inside the TFF wheel, found without importing TFF."""
    spec = importlib.util.find_spec("tensorflow_federated")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("tensorflow_federated is not installed; run deploy/bootstrap.sh")
    path = Path(spec.origin).parent / "data" / BINARY_NAME
    if not path.is_file():
        raise FileNotFoundError(f"TFF's executor service is missing: {path}")
    return path


def tff_version() -> str:
    spec = importlib.util.find_spec("tensorflow_federated")
    if spec is None or spec.origin is None:
        return "unknown"
    version_file = Path(spec.origin).parent / "version.py"
    for line in version_file.read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("'\"")
    return "unknown"


def start(
    port: int,
    cwd: Path,
    log_file: BinaryIO | None = None,
    max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
    max_concurrent_calls: int = -1,
) -> subprocess.Popen:
    args = [
        str(binary_path()),
        f"--port={port}",
        f"--grpc_max_message_length_megabytes={max_message_mb}",
        f"--max_concurrent_computation_calls={max_concurrent_calls}",
    ]
    return processes.spawn(
        args,
        cwd=cwd,
        env=loopback.environment(),
        stdout=log_file if log_file is not None else subprocess.DEVNULL,
        stderr=subprocess.STDOUT if log_file is not None else subprocess.DEVNULL,
        death_signal=signal.SIGKILL,
    )


def loopback_address(port: int) -> str:
    """The address a local client dials a confined `worker_binary` at."""
    return f"127.0.0.1:{port}"
