"""A worker pod of the Kubernetes manifests, run with `podman kube play`.

No Kubernetes cluster can run here (DESIGN.md, section 10), so this smoke test
takes the StatefulSet's pod template as it is (its init container, command,
user, read-only root, probes) and runs one replica of it under podman. What a
cluster would do and podman 4.3 cannot is done by the test, and only that: the
pod gets a name of this run's (`fc<run id>-fedcompose-worker-0`, where the
StatefulSet would name it `fedcompose-worker-0`), the kustomization's image and
labels are applied, the Secrets volume becomes a host directory laid out as the
projected volume would be (mode 0440, group 10001, as kubelet with fsGroup
makes it), the shards claim becomes a host directory with the pod's
`subPathExpr` resolved, and the init container is kept after it ran (a podman
4.3 race). Then the coordinator's `fedcompose status` reaches the worker over
mutual TLS from this host.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import shutil
import uuid
from pathlib import Path

import pytest
import yaml

from shared import worker_dir
from tests import container_env
from tests.conftest import fedcompose

# The first container test of a fresh machine builds the base and the image
# (measured: about 8 minutes on 2 busy cores), beyond pytest's usual 900 s.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

MANIFESTS = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
GID = 10001


def _pod_of_statefulset(image: str, pod_name: str, kits: Path, shards: Path, label: str) -> dict:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    statefulset = yaml.safe_load((MANIFESTS / "worker-statefulset.yaml").read_text())
    template = copy.deepcopy(statefulset["spec"]["template"])
    labels = dict(template["metadata"]["labels"])
    for entry in kustomization.get("labels", []):
        labels.update(entry["pairs"])
    key, value = label.split("=")
    labels[key] = value
    spec = template["spec"]
    images = {i["name"]: i for i in kustomization.get("images", [])}
    for container in spec["containers"] + spec["initContainers"]:
        assert container["image"] in images, container["image"]
        container["image"] = image
        for mount in container["volumeMounts"]:
            if mount.get("subPathExpr") == "$(POD_NAME)":
                assert mount["name"] == "shards"
                del mount["subPathExpr"]
    volumes = []
    for volume in spec["volumes"]:
        if volume["name"] == "kits":
            assert "projected" in volume
            volume = {"name": "kits", "hostPath": {"path": str(kits), "type": "Directory"}}
        elif volume["name"] == "shards":
            assert volume["persistentVolumeClaim"]["claimName"] == "fedcompose-shards"
            path = str(shards / pod_name)
            volume = {"name": "shards", "hostPath": {"path": path, "type": "Directory"}}
        volumes.append(volume)
    spec["volumes"] = volumes
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name,
            "labels": labels,
            # podman 4.3 removes a "once" init container as soon as it exits and
            # at times finds it still running then (its kube play fails): keep it.
            "annotations": {"io.podman.annotations.init.container.type": "always"},
        },
        "spec": spec,
    }


def _secret_like(kit: Path, dest: Path) -> None:
    """A kit laid out as a projected Secret volume mounts it (root, group fsGroup, 0440)."""
    dest.mkdir(parents=True)
    for name in ("ca.pem", "cert.pem", "key.pem", "kit.json"):
        shutil.copy(kit / name, dest / name)
        os.chown(dest / name, 0, GID)
        os.chmod(dest / name, 0o440)


def test_a_worker_pod_of_the_statefulset_serves_mutual_tls(tmp_path):
    image = container_env.fedcompose_image()
    podman = container_env.Podman(uuid.uuid4().hex[:8])
    pod_name = podman.name("fedcompose-worker-0")
    network = podman.name("net")
    kits_root, shards_root = tmp_path / "secrets", tmp_path / "shards-volume"
    try:
        podman("network", "create", "--label", podman.label, network)
        subnet = podman(
            "network", "inspect", "--format", "{{range .Subnets}}{{.Subnet}}{{end}}", network
        ).stdout.strip()
        address = str(ipaddress.ip_network(subnet)[100])
        kits = tmp_path / "kits"
        fedcompose(
            "provision", "--kits-dir", str(kits), "--sites", f"{pod_name}={address}", check=True
        )
        _secret_like(kits / pod_name, kits_root / pod_name)
        os.chmod(kits_root, 0o755)
        fedcompose("data", "--workers", "1", "--shards-dir", str(tmp_path / "shards"), check=True)
        shards_root.mkdir()
        shutil.copytree(tmp_path / "shards" / "shard-000", shards_root / pod_name)

        pod = _pod_of_statefulset(image, pod_name, kits_root, shards_root, podman.label)
        play = tmp_path / "pod.yaml"
        play.write_text(yaml.safe_dump(pod, sort_keys=False))
        podman("kube", "play", "--network", network, "--ip", address, str(play), timeout=300)
        worker = f"{pod_name}-worker"
        podman.wait_log(worker, worker_dir.READY_MARK)

        # The coordinator's view, from this host, over mutual TLS.
        status = fedcompose(
            "status", "--addresses", f"{address}:10000", "--tls-dir", str(kits / "coordinator"),
            "--json", timeout=300,
        )  # fmt: skip
        assert status.returncode == 0, status.stdout + status.stderr
        row = json.loads(status.stdout.splitlines()[0])
        assert row["up"] and row["tls"] and row["clients"] > 0, row

        # The pod's own kit only, its key private to the pod's user.
        assert podman("exec", worker, "id", "-u").stdout.strip() == "10001"
        key = podman("exec", worker, "stat", "-c", "%a %u", "/kit/key.pem").stdout.split()
        assert key == ["600", "10001"]
        assert podman("exec", worker, "ls", "/kits", check=False).returncode != 0
        assert podman("exec", worker, "touch", "/x", check=False).returncode != 0  # read-only
        health = podman("healthcheck", "run", worker, check=False, timeout=60)
        assert health.returncode == 0, health.stdout + health.stderr
    finally:
        podman.remove_all()
    assert not podman.leftovers(), podman.leftovers()
