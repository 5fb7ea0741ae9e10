"""The pods' init step (deploy/container/prepare.py), run as its command line."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from shared import tls
from shared.errors import UsageError
from tests.conftest import ROOT, fedcompose


def _prepare(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deploy.container.prepare", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_the_pods_own_kit_is_copied_with_a_private_key(tmp_path):
    kits = tmp_path / "kits"
    fedcompose(
        "provision", "--kits-dir", str(kits), "--sites", "w-0=w-0.svc,w-1=w-1.svc", check=True
    )
    # As a Secret volume with an fsGroup mounts it: the key readable by the group.
    mounted = tmp_path / "secrets"
    for name in ("w-0", "w-1"):
        (mounted / name).mkdir(parents=True)
        for f in ("ca.pem", "cert.pem", "key.pem", "kit.json"):
            (mounted / name / f).write_bytes((kits / name / f).read_bytes())
            os.chmod(mounted / name / f, 0o440)
    result = _prepare(
        f"--kit-from={mounted}/$(POD_NAME)", f"--kit-to={tmp_path / 'kit'}", env={"POD_NAME": "w-1"}
    )
    assert result.returncode == 0, result.stderr
    copied = tmp_path / "kit"
    assert sorted(p.name for p in copied.iterdir()) == ["ca.pem", "cert.pem", "key.pem", "kit.json"]
    assert (copied / "key.pem").read_bytes() == (kits / "w-1" / "key.pem").read_bytes()
    assert stat.S_IMODE((copied / "key.pem").stat().st_mode) == 0o600
    # fedcompose accepts the copy as this worker's kit; it refuses the mounted one.
    assert tls.load_kit(copied, tls.WORKER).name == "w-1"
    with pytest.raises(UsageError, match="readable by others"):
        tls.load_kit(mounted / "w-1", tls.WORKER)


def test_a_missing_kit_or_variable_is_one_line_and_exit_2(tmp_path):
    result = _prepare(f"--kit-from={tmp_path}/$(POD_NAME)", f"--kit-to={tmp_path / 'kit'}")
    env_missing = result
    assert env_missing.returncode == 2
    assert env_missing.stderr.strip().count("\n") == 0 and "no POD_NAME" in env_missing.stderr
    result = _prepare(f"--kit-from={tmp_path}/nowhere", f"--kit-to={tmp_path / 'kit'}")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "kubectl create secret generic" in result.stderr
    assert not (tmp_path / "kit").exists()


def test_waiting_for_a_shard_that_never_comes_ends_with_the_reason(tmp_path):
    result = _prepare(f"--wait-for={tmp_path / 'manifest.json'}", "--wait-timeout=0.5")
    assert result.returncode == 2 and "Load the shards" in result.stderr
