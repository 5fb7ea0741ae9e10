"""fedcompose in containers: three worker containers and a coordinator container
on a podman network, over mutual TLS, with real processes and TFF's real
executor service in each.

The set-up (tests/container_env.py) installs podman, runc and mmdebstrap, writes
the podman settings, makes a Debian bookworm base and builds the image, reusing
whatever is already done. Every container, network and volume a test makes
carries its run's label and is removed in `finally`; the test then checks that
none is left. A test that lacks what it needs fails with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import pytest

from shared import worker_dir
from tests import container_env
from tests.conftest import fedcompose

# The first container test of a fresh machine builds the base and the image
# (measured: about 8 minutes on 2 busy cores), beyond pytest's usual 900 s.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

UID = 10001
ROUNDS = 12
RUNS = "/var/lib/fedcompose/runs"
SCANNER = Path(__file__).with_name("port_scan.py")


def _owned_copy(source: Path, dest: Path) -> Path:
    """A kit copied for the container's user (a kit's key is 0600, its owner's only)."""
    shutil.copytree(source, dest)
    for path in [dest, *dest.rglob("*")]:
        os.chown(path, UID, UID)
    return dest


def _rows(run_dir: Path) -> list[dict]:
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _wait_file(path: Path, podman: container_env.Podman, container: str, timeout=600) -> dict:
    """Until the coordinator pauses at the point `path` names; what it said."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if not podman.state(container).get("Running"):
            container_env.fail(f"the coordinator stopped:\n{podman.logs(container)[-4000:]}")
        if time.monotonic() > deadline:
            container_env.fail(f"the coordinator never paused at {path.name}")
        time.sleep(0.2)
    time.sleep(0.2)  # written whole by then; JSON below says if not
    return json.loads(path.read_text())


def _wait_view(run_dir: Path, address: str, states: tuple[str, ...], timeout: float = 300):
    deadline = time.monotonic() + timeout
    while True:
        try:
            view = json.loads((run_dir / "workers.json").read_text())
            entry = next(w for w in view["workers"] if w["address"] == address)
            # "admissible": up, or rejoining and warmed up (it serves the next round).
            admissible = entry["state"] == "up" or "warmed up" in entry.get("reason", "")
            if entry["state"] in states or ("admissible" in states and admissible):
                return entry
        except (FileNotFoundError, ValueError, StopIteration, KeyError):
            pass
        if time.monotonic() > deadline:
            container_env.fail(f"the coordinator never saw {address} {' or '.join(states)}")
        time.sleep(0.5)


def _listeners(podman: container_env.Podman, container: str) -> list[tuple[str, int]]:
    """(address, port) of every TCP listener in the container's network namespace."""
    from shared.loopback import _parse_address

    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        text = podman("exec", container, "cat", table, check=False).stdout
        for line in text.splitlines()[1:]:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":
                found.append(_parse_address(fields[1]))
    return found


def test_federation_of_containers_trains_over_mutual_tls(tmp_path):
    image = container_env.fedcompose_image()
    podman = container_env.Podman(uuid.uuid4().hex[:8])
    network = podman.name("net")
    workers = [podman.name(f"w{i}") for i in range(3)]
    coordinator = podman.name("coordinator")
    volume = podman.name("runs")
    shards, kits, mounts = tmp_path / "shards", tmp_path / "kits", tmp_path / "mounts"
    fedcompose("data", "--workers", "3", "--shards-dir", str(shards), check=True, timeout=300)
    sites = ",".join(f"w{i}={name}" for i, name in enumerate(workers))
    fedcompose("provision", "--kits-dir", str(kits), "--sites", sites, check=True, timeout=120)
    addresses = [f"{name}:10000" for name in workers]
    try:
        podman("network", "create", "--label", podman.label, network)
        podman("volume", "create", "--label", podman.label, volume)
        runs_host = Path(
            podman("volume", "inspect", "--format", "{{.Mountpoint}}", volume).stdout.strip()
        )
        os.chown(runs_host, UID, UID)
        common = ["--label", podman.label, "--network", network, "--read-only", "-e", "HOME=/tmp"]

        def start_worker(i: int) -> None:
            kit = _owned_copy(kits / f"w{i}", mounts / f"w{i}")
            podman(
                "run", "--detach", "--name", workers[i], *common,
                "-v", f"{kit}:/etc/fedcompose/w{i}:ro",
                "-v", f"{shards / f'shard-{i:03d}'}:/var/lib/fedcompose/shard:ro",
                image, "worker", "--shard", "/var/lib/fedcompose/shard", "--port", "10000",
                "--tls-dir", f"/etc/fedcompose/w{i}",
            )  # fmt: skip

        for i in range(3):
            start_worker(i)
        for name in workers:
            podman.wait_log(name, worker_dir.READY_MARK)
        health = podman("healthcheck", "run", workers[0], check=False, timeout=60)
        assert health.returncode == 0, health.stdout + health.stderr
        said = podman("exec", workers[0], "python", "-m", "deploy.container.healthcheck").stdout
        assert said.startswith("healthy: worker serves mutual TLS on port 10000"), said
        # The same image running no fedcompose is unhealthy.
        idle = podman.name("idle")
        podman("run", "--detach", "--name", idle, *common, "--entrypoint", "sleep", image, "600")
        assert podman("healthcheck", "run", idle, check=False, timeout=60).returncode == 1
        podman("rm", "--force", "--time", "0", idle)

        coordinator_kit = _owned_copy(kits / "coordinator", mounts / "coordinator")
        pause_a, pause_b = runs_host / "pause-a", runs_host / "pause-b"
        podman(
            "run", "--detach", "--name", coordinator, *common,
            "-v", f"{coordinator_kit}:/etc/fedcompose/coordinator:ro",
            "-v", f"{volume}:{RUNS}",
            "-e", f"FEDCOMPOSE_PAUSE_AT=dispatch:3={RUNS}/pause-a;dispatch:8={RUNS}/pause-b",
            image, "train", "--addresses", ",".join(addresses),
            "--tls-dir", "/etc/fedcompose/coordinator", "--run-dir", f"{RUNS}/run",
            "--rounds", str(ROUNDS), "--eval-every", str(ROUNDS),
        )  # fmt: skip
        sent_to = _wait_file(pause_a, podman, coordinator)["workers"]

        # Mid-run, every executor service is up. Each container listens on more
        # than its TLS port (TFF's executor services, on loopback), but from
        # another container on the network only the workers' TLS ports answer.
        for name in [*workers, coordinator]:
            listening = _listeners(podman, name)
            assert any(port != 10000 for _, port in listening), (name, listening)
        probe = podman(
            "run", "--rm", "--interactive", "--name", podman.name("probe"), *common,
            "--entrypoint", "python", image, "-", *workers, coordinator,
            timeout=900, input_file=SCANNER,
        )  # fmt: skip
        scanned = json.loads(probe.stdout)
        print(f"accepting connections from another container: {scanned}")
        for name in workers:
            assert scanned[name] and all(ports == [10000] for ports in scanned[name].values()), (
                name,
                scanned[name],
            )
        assert scanned[coordinator] and all(p == [] for p in scanned[coordinator].values())

        # A worker container stopped (SIGTERM, its worker stops in order) and
        # started again while the run goes on.
        victim = next(i for i, a in enumerate(addresses) if a in sent_to)
        podman("stop", "--time", "30", workers[victim], timeout=90)
        pause_a.unlink()
        _wait_file(pause_b, podman, coordinator)
        run_dir = runs_host / "run"
        assert _wait_view(run_dir, addresses[victim], ("down", "rejoining", "refused"), 60)
        podman("start", workers[victim])
        podman.wait_log(workers[victim], worker_dir.READY_MARK, count=2)
        # Held until it is warmed up: a rejoining worker builds its executors off
        # the round path, and is taken into the first round after that.
        _wait_view(run_dir, addresses[victim], ("admissible",))
        pause_b.unlink()
        code = podman.wait_exit(coordinator, timeout=900)
        logs = podman.logs(coordinator)
        assert code == 0, logs[-4000:]
        rows = _rows(run_dir)  # the volume goes with the rest below
    finally:
        podman.remove_all()
    assert not podman.leftovers(), podman.leftovers()

    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    label = f"worker{victim}"
    down = [r for r in rows if victim not in r["live_workers"]]
    assert down, "the stopped worker was never left out of a round"
    after = [r for r in rows if r["round"] > down[-1]["round"]]
    assert after and all(r["live_workers"] == [0, 1, 2] for r in after)
    assert any(label in r["workers"] for r in after), "its clients were never sampled again"
    assert f"worker {addresses[victim]} rejoined" in logs
    final = rows[-1]["eval"]
    assert final["examples"] == 360 and final["loss"] < rows[0]["train"]["loss"], final
