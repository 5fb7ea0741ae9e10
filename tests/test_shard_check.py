"""A worker checks its shard at start: a bad one stops it with the file and the problem.

Every case runs the real `fedcompose worker` on a shard written by
`deploy.shards.write_shards` and then damaged in one way.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest

from deploy.data import shards
from deploy.data.sources import ClientData, FederatedSource
from shared import shard_format
from tests.conftest import ROOT, fedcompose, kill_tree, start_fedcompose

CLIENT = "writer_b"
"""The client each damaged shard has something wrong with."""


def client_data(rng: np.random.Generator, client_id: str, train: int, test: int) -> ClientData:
    return ClientData(
        id=client_id,
        train_pixels=rng.random((train, 28, 28), dtype=np.float32),
        train_labels=rng.integers(0, 10, train).astype(np.int32),
        test_pixels=rng.random((test, 28, 28), dtype=np.float32),
        test_labels=rng.integers(0, 10, test).astype(np.int32),
    )


def tiny_source(edit: Callable[[ClientData], None] | None = None) -> FederatedSource:
    rng = np.random.default_rng(0)
    clients = [client_data(rng, f"writer_{x}", 6, 2) for x in "abc"]
    if edit is not None:
        edit(clients[1])
    return FederatedSource(dataset="tiny", num_classes=10, clients=clients)


def write_shard(root: Path, source: FederatedSource | None = None) -> Path:
    source = source or tiny_source()
    shards.write_shards(source, [list(range(len(source.clients)))], root, {"scheme": "test"})
    return shards.shard_dir(root, 0)


def client_file(shard: Path, split: str = "train") -> Path:
    return shard / shard_format.client_path(split, CLIENT)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def worker_refuses(shard: Path) -> str:
    """Runs the worker on `shard`; returns its stderr after checking it failed."""
    result = fedcompose("worker", "--shard", str(shard), "--port", str(free_port()), timeout=60)
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "bad shard: " in result.stderr, result.stderr
    return result.stderr


def edit_manifest(shard: Path, edit: Callable[[dict], None]) -> Path:
    path = shard / shard_format.MANIFEST_NAME
    body = json.loads(path.read_text())
    edit(body)
    path.write_text(json.dumps(body))
    return path


# --- one test per kind of bad shard ----------------------------------------------------


def test_missing_client_file(tmp_path):
    shard = write_shard(tmp_path)
    client_file(shard).unlink()
    assert f"{client_file(shard)}: missing (listed in the manifest)" in worker_refuses(shard)


def test_unreadable_client_file_is_refused_by_the_quick_check_too():
    """--shard-check quick checked sizes only: a client file the worker cannot
    read passed, and failed inside a round, blamed on the worker. Run as user
    nobody (root reads anything) on a shard it may search but not read."""
    setpriv = shutil.which("setpriv")
    assert setpriv, "this test runs the worker as user nobody with setpriv (util-linux)"
    root = Path(tempfile.mkdtemp(prefix="fedcompose-test-unreadable-"))
    try:
        shard = write_shard(root)
        for directory in (root, *root.rglob("*")):
            if directory.is_dir():
                directory.chmod(0o755)
            else:
                directory.chmod(0o644)
        client_file(shard).chmod(0o000)
        for check in ("quick", "full"):
            result = subprocess.run(
                [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                 sys.executable, "-m", "deploy.cli", "worker", "--shard", str(shard),
                 "--port", str(free_port()), "--shard-check", check, "--ready-timeout", "20"],
                cwd=ROOT, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert result.returncode == 3, (check, result.stderr[-2000:])
            assert f"{client_file(shard)}: cannot read (Permission denied)" in result.stderr
            assert "Traceback" not in result.stderr
        assert os.stat(client_file(shard)).st_mode & 0o777 == 0
    finally:
        shutil.rmtree(root)


def test_truncated_client_file(tmp_path):
    shard = write_shard(tmp_path)
    data = client_file(shard).read_bytes()
    client_file(shard).write_bytes(data[: len(data) - 100])
    stderr = worker_refuses(shard)
    assert f"{client_file(shard)}: {len(data) - 100} bytes" in stderr
    assert "the file is truncated" in stderr


def test_records_of_another_image_size(tmp_path):
    shard = write_shard(tmp_path)
    big = np.zeros(6, dtype=[("pixels", "<f4", (32 * 32,)), ("label", "<i4")])
    client_file(shard).write_bytes(big.tobytes())
    stderr = worker_refuses(shard)
    assert f"{client_file(shard)}: 6 examples of 4100 bytes, i.e. 32x32 pixels" in stderr
    assert "wrong image shape" in stderr


def test_manifest_with_another_image_shape(tmp_path):
    shard = write_shard(tmp_path)
    manifest = edit_manifest(shard, lambda body: body["task"].update(image_shape=[32, 32]))
    assert f"{manifest}: image shape [32, 32], expected [28, 28]" in worker_refuses(shard)


def test_label_out_of_range(tmp_path):
    def mislabel(client: ClientData) -> None:
        client.train_labels[3] = 12

    shard = write_shard(tmp_path, tiny_source(mislabel))
    assert f"{client_file(shard)}: label 12 out of range for 10 classes" in worker_refuses(shard)


def test_client_without_training_examples(tmp_path):
    def empty(client: ClientData) -> None:
        client.train_pixels = client.train_pixels[:0]
        client.train_labels = client.train_labels[:0]

    shard = write_shard(tmp_path, tiny_source(empty))
    expected = f"{client_file(shard)}: client '{CLIENT}' has no training examples"
    assert expected in worker_refuses(shard)


def test_corrupt_client_file(tmp_path):
    shard = write_shard(tmp_path)
    data = bytearray(client_file(shard, "test").read_bytes())
    data[len(data) // 2] ^= 0xFF
    client_file(shard, "test").write_bytes(bytes(data))
    expected = f"{client_file(shard, 'test')}: checksum does not match the manifest"
    assert expected in worker_refuses(shard)


def test_missing_manifest(tmp_path):
    shard = write_shard(tmp_path)
    (shard / shard_format.MANIFEST_NAME).unlink()
    assert f"{shard / shard_format.MANIFEST_NAME}: no manifest" in worker_refuses(shard)


def test_missing_directory(tmp_path):
    shard = tmp_path / "no-such-shard"
    assert f"{shard}: no such directory" in worker_refuses(shard)


# --- a good shard ----------------------------------------------------------------------


class StderrLines:
    """Collects a child's stderr lines in the background, so waiting never blocks."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, proc: subprocess.Popen, marker: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(marker in line for line in self.lines):
                return True
            if proc.poll() is not None:
                self._thread.join(timeout=5)
                return any(marker in line for line in self.lines)
            time.sleep(0.1)
        return False

    def text(self) -> str:
        return "\n".join(self.lines)


def executors_on(port: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if f"--port={port}" in cmdline and any("worker_binary" in part for part in cmdline):
            found.append(proc)
    return found


@pytest.mark.timeout(120)
def test_good_shard_serves_until_sigterm_and_leaves_no_executor(tmp_path):
    shard = write_shard(tmp_path)
    port = free_port()
    proc = start_fedcompose(
        "worker", "--shard", str(shard), "--port", str(port), "--shard-check=full"
    )
    stderr = StderrLines(proc)
    try:
        assert stderr.wait_for(proc, "ready: serving 3 clients", timeout=90), stderr.text()
        assert executors_on(port), "the worker should be running TFF's executor service"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, stderr.text()
    finally:
        if proc.poll() is None:
            kill_tree(proc)
            proc.wait(timeout=10)
    leftovers = executors_on(port)
    assert not leftovers, [p.info["cmdline"] for p in leftovers]
