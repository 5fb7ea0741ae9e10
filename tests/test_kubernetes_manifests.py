"""The Kubernetes manifests (deploy/kubernetes/), checked offline.

No cluster can run here (DESIGN.md, section 10). Every manifest is validated
with `kubernetes-validate --strict` against the Kubernetes API schemas it
bundles (installed by the test into a tool virtualenv of its own, pinned), and
the manifests are checked to fit together: labels, ports, names, the worker
memory budget. tests/test_kube_play.py runs a worker pod from them with
`podman kube play`.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy.container import build
from shared.config import FederationConfig

MANIFESTS = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
KUBERNETES_VALIDATE = "kubernetes-validate==1.37.0"
WORKER_OVERHEAD_MB = 256
"""Room for the worker process and its TLS proxy beside TFF's executor service
(measured at 69 MB RSS in a container during training: docs/containers.md)."""


def validator() -> Path:
    """kubernetes-validate in a virtualenv of its own under the cache, made once."""
    venv = build.cache_dir() / f"tools-{KUBERNETES_VALIDATE.replace('==', '-')}"
    program = venv / "bin" / "kubernetes-validate"
    if program.is_file():
        return program
    with build.locked("kubernetes-validate"):
        if program.is_file():
            return program
        pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
        steps = [
            [sys.executable, "-m", "venv", "--clear", str(venv)],
            [*pip, "install", "--quiet", KUBERNETES_VALIDATE],
        ]
        for step in steps:
            result = subprocess.run(step, capture_output=True, text=True, timeout=600)
            if result.returncode != 0:
                pytest.fail(
                    f"cannot install {KUBERNETES_VALIDATE} into {venv} (it comes from the "
                    f"package index): {result.stderr.strip().splitlines()[-1:]}",
                    pytrace=False,
                )
    return program


def _validate(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(validator()), "--strict", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _kustomization() -> dict:
    return yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())


def _resources() -> dict[str, dict]:
    """kind -> the resource, for every file the kustomization lists."""
    found = {}
    for name in _kustomization()["resources"]:
        for doc in yaml.safe_load_all((MANIFESTS / name).read_text()):
            found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found


def _mebibytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", quantity).groups()
    scale = {"Mi": 1, "Gi": 1024, "M": 1e6 / 2**20, "G": 1e9 / 2**20}[unit]
    return float(number) * scale


def test_every_manifest_passes_strict_schema_validation():
    files = [MANIFESTS / name for name in _kustomization()["resources"]]
    files += sorted((MANIFESTS / "tools").glob("*.yaml"))
    result = _validate(*files)
    assert result.returncode == 0, result.stdout + result.stderr
    # A kind without a schema is only a warning: each file must have passed.
    for path in files:
        assert re.search(rf"{re.escape(str(path))} passed for resource", result.stdout), (
            path,
            result.stdout,
        )


def test_strict_validation_rejects_a_misspelt_field(tmp_path):
    """The validator is strict: the same StatefulSet with one field misspelt fails."""
    text = (MANIFESTS / "worker-statefulset.yaml").read_text()
    broken = tmp_path / "statefulset.yaml"
    broken.write_text(text.replace("  replicas: 3", "  replica: 3", 1))
    result = _validate(broken)
    assert result.returncode != 0 and "'replica' was unexpected" in result.stdout, result.stdout


def test_the_kustomization_lists_every_manifest():
    listed = set(_kustomization()["resources"])
    on_disk = {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_the_manifests_fit_together():
    r = _resources()
    workers = r["StatefulSet/fedcompose-worker"]
    pod = workers["spec"]["template"]
    worker_labels = pod["metadata"]["labels"]
    assert workers["spec"]["selector"]["matchLabels"] == worker_labels
    service = r["Service/fedcompose-worker"]
    assert workers["spec"]["serviceName"] == "fedcompose-worker"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == worker_labels

    job = r["Job/fedcompose-coordinator"]
    coordinator_labels = job["spec"]["template"]["metadata"]["labels"]
    (container,) = pod["spec"]["containers"]
    (port,) = container["ports"]

    # Only the coordinator reaches the workers, only on their TLS port; no egress.
    policy = r["NetworkPolicy/fedcompose-worker"]["spec"]
    assert policy["podSelector"]["matchLabels"] == worker_labels
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"] and policy["egress"] == []
    (rule,) = policy["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": coordinator_labels}}]
    assert rule["ports"] == [{"protocol": "TCP", "port": port["containerPort"]}]
    assert coordinator_labels != worker_labels

    # One worker per shard: the coordinator dials each replica by its stable
    # name, and each replica's kit comes from a Secret of its own.
    replicas = workers["spec"]["replicas"]
    names = [f"fedcompose-worker-{i}" for i in range(replicas)]
    (train,) = job["spec"]["template"]["spec"]["containers"]
    addresses = next(a for a in train["args"] if a.startswith("--addresses="))
    assert addresses.split("=", 1)[1].split(",") == [
        f"{n}.fedcompose-worker:{port['containerPort']}" for n in names
    ]
    kits = next(v for v in pod["spec"]["volumes"] if v["name"] == "kits")
    sources = kits["projected"]["sources"]
    assert [s["secret"]["name"] for s in sources] == [f"fedcompose-kit-{n}" for n in names]
    for source, name in zip(sources, names, strict=True):
        assert {i["path"] for i in source["secret"]["items"]} == {
            f"{name}/{f}" for f in ("ca.pem", "cert.pem", "key.pem", "kit.json")
        }
    # The Secrets are mounted only where the pod's own kit is copied out of them.
    assert not any(m["name"] == "kits" for m in container["volumeMounts"])
    (init,) = pod["spec"]["initContainers"]
    assert any(m["name"] == "kits" for m in init["volumeMounts"])
    shard_mount = next(m for m in container["volumeMounts"] if m["name"] == "shards")
    assert shard_mount["subPathExpr"] == "$(POD_NAME)" and shard_mount["readOnly"]

    # Memory: the executor's budget (the coordinator's --worker-memory-mb) plus
    # the worker process; no lower request than that, and a limit above it.
    budget = FederationConfig().worker_memory_mb
    requested = _mebibytes(container["resources"]["requests"]["memory"])
    limit = _mebibytes(container["resources"]["limits"]["memory"])
    assert budget + WORKER_OVERHEAD_MB <= requested < limit
    assert not any(a.startswith("--worker-memory-mb=") for a in train["args"]), (
        "a budget other than the default needs the worker's request changed to match"
    )

    # Nothing runs as root, and no pod gets API credentials.
    for spec in (pod["spec"], job["spec"]["template"]["spec"]):
        assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"]
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"] + spec["initContainers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
