"""What the container tests need, set up from scratch and idempotently.

CI runs the suite as root on a fresh Debian 12 machine with no image registry
reachable (DESIGN.md, section 10), so this module installs podman, runc and
mmdebstrap from Debian's archive, writes the podman settings this kernel needs,
makes a Debian bookworm base image (its python3 is 3.11) with mmdebstrap and
`podman import`, and builds fedcompose's image on it. Everything already done
is reused: the packages, the settings, the base (tagged by its recipe) and the
image (tagged by the content hash of its inputs, `deploy.container.build`).

A test that lacks what it needs fails with the reason; it never skips.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from deploy.container import build

PACKAGES = ("podman", "runc", "mmdebstrap")
CONTAINERS_CONF = Path("/etc/containers/containers.conf")
# crun fails on this kernel's hybrid cgroup layout, and the default nofile
# limit cannot be raised here (DESIGN.md, section 10).
CONTAINERS_CONF_TEXT = """\
# Written by fedcompose's test set-up (tests/container_env.py).
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
"""
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("ca-certificates", "python3", "python3-distutils")
"""Python 3.11 with the standard library the official image has: Debian keeps
distutils (which TensorFlow 2.14 imports) in a package of its own."""
BASE_REPO = "localhost/fedcompose-test-base"


def fail(reason: str) -> None:
    pytest.fail(reason, pytrace=False)


def _run(args: list[str], timeout: float, what: str) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        fail(f"{what}: {e}")
    if result.returncode != 0:
        tail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-3:]
        fail(f"{what} failed (exit {result.returncode}): {' | '.join(tail)}")
    return result


def install_packages() -> None:
    missing = [p for p in PACKAGES if shutil.which(p) is None and not _dpkg_has(p)]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        fail(
            f"the container tests need {', '.join(missing)}; run them as root on Debian "
            "(CI does), or `apt-get install podman runc mmdebstrap`"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    update = subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600)
    install = subprocess.run(
        ["apt-get", "install", "-y", "-qq", *PACKAGES],
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
    )
    if install.returncode != 0:
        tail = install.stderr.strip().splitlines()[-2:]
        fail(
            f"apt-get install {' '.join(PACKAGES)} failed (update exit {update.returncode}): "
            + " | ".join(tail)
        )


def _dpkg_has(package: str) -> bool:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
    )
    return result.returncode == 0 and "install ok installed" in result.stdout


def write_containers_conf() -> None:
    """Writes the settings podman needs here; a different file is kept beside it."""
    if CONTAINERS_CONF.is_file() and CONTAINERS_CONF.read_text() == CONTAINERS_CONF_TEXT:
        return
    if os.geteuid() != 0:
        fail(f"the container tests must write {CONTAINERS_CONF}; run them as root (CI does)")
    CONTAINERS_CONF.parent.mkdir(parents=True, exist_ok=True)
    if CONTAINERS_CONF.exists():
        backup = CONTAINERS_CONF.with_name("containers.conf.before-fedcompose")
        if not backup.exists():
            shutil.copy2(CONTAINERS_CONF, backup)
    tmp = CONTAINERS_CONF.with_name(".containers.conf.fedcompose-tmp")
    tmp.write_text(CONTAINERS_CONF_TEXT)
    os.replace(tmp, CONTAINERS_CONF)


def base_image() -> str:
    """A Debian bookworm base with Python 3.11, made here (no registry is reachable)."""
    recipe = f"{BASE_SUITE} minbase {','.join(BASE_PACKAGES)}"
    tag = f"{BASE_REPO}:{BASE_SUITE}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    if build.image_exists(tag):
        return tag
    with build.locked("base"):  # one maker at a time (test processes run side by side)
        if not build.image_exists(tag):
            _make_base(tag)
    return tag


def _make_base(tag: str) -> None:
    with tempfile.TemporaryDirectory(prefix="fedcompose-rootfs-", dir=build.cache_dir()) as tmp:
        tarball = Path(tmp) / "rootfs.tar"
        _run(
            [
                "mmdebstrap",
                "--quiet",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                BASE_SUITE,
                str(tarball),
            ],
            timeout=1800,
            what="mmdebstrap (making the test base image)",
        )
        _run(
            ["podman", "import", "--change", 'CMD ["/bin/bash"]', str(tarball), tag],
            timeout=600,
            what="podman import (the test base image)",
        )


_built: dict[str, str] = {}


def fedcompose_image() -> str:
    """fedcompose's image on the test base: set-up first, then built (or reused)."""
    if "image" in _built:
        return _built["image"]
    with build.locked("setup"):  # apt-get and the settings file: one process at a time
        install_packages()
        write_containers_conf()
    started = time.monotonic()
    base = base_image()
    try:
        image = build.ensure_image(base=base, log=print)
    except build.BuildError as e:
        fail(f"building fedcompose's image failed: {e}")
    print(f"fedcompose image {image} ready in {time.monotonic() - started:.0f}s")
    _built["image"] = image
    return image


class Podman:
    """Containers, networks and volumes of one test, all labelled with its run id,
    so that `remove_all` finds every one of them and `leftovers` can prove it."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.label = f"fedcompose.test={run_id}"

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True, input_file: Path | None = None
    ) -> subprocess.CompletedProcess:
        try:
            with open(input_file or os.devnull, "rb") as stdin:
                result = subprocess.run(
                    ["podman", *args], stdin=stdin, capture_output=True, timeout=timeout
                )
        except subprocess.TimeoutExpired:
            fail(f"podman {' '.join(args[:3])} ... took longer than {timeout:g}s")
        result.stdout = result.stdout.decode(errors="replace")
        result.stderr = result.stderr.decode(errors="replace")
        if check and result.returncode != 0:
            fail(f"podman {' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def name(self, suffix: str) -> str:
        return f"fc{self.run_id}-{suffix}"

    def state(self, container: str) -> dict:
        out = self("inspect", "--format", "{{json .State}}", container, check=False)
        return json.loads(out.stdout) if out.returncode == 0 else {}

    def logs(self, container: str) -> str:
        result = self("logs", container, check=False, timeout=60)
        return result.stdout + result.stderr

    def wait_log(self, container: str, mark: str, count: int = 1, timeout: float = 300) -> None:
        """Until `mark` shows `count` times in the container's log; fails at once,
        with the log, if the container stops."""
        deadline = time.monotonic() + timeout
        while True:
            logs = self.logs(container)
            if logs.count(mark) >= count:
                return
            state = self.state(container)
            if not state.get("Running"):
                code = state.get("ExitCode")
                fail(f"{container} stopped (exit {code}) before {mark!r}:\n{logs[-3000:]}")
            if time.monotonic() > deadline:
                fail(f"{container}: no {mark!r} within {timeout:g}s:\n{logs[-3000:]}")
            time.sleep(1)

    def wait_exit(self, container: str, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            state = self.state(container)
            if state and not state.get("Running") and state.get("Status") in ("exited", "stopped"):
                return int(state.get("ExitCode", -1))
            if time.monotonic() > deadline:
                fail(f"{container} still runs after {timeout:g}s:\n{self.logs(container)[-3000:]}")
            time.sleep(1)

    def leftovers(self) -> list[str]:
        found = []
        for kind, args in (
            ("container", ["ps", "--all", "--format", "{{.Names}}"]),
            ("pod", ["pod", "ps", "--format", "{{.Name}}"]),
            ("network", ["network", "ls", "--format", "{{.Name}}"]),
            ("volume", ["volume", "ls", "--format", "{{.Name}}"]),
        ):
            out = self(*args, "--filter", f"label={self.label}", check=False).stdout
            found += [f"{kind} {name}" for name in out.split()]
        return found

    def remove_all(self) -> None:
        """Everything this test made, whatever state it is in."""
        label = f"label={self.label}"
        pods = self("pod", "ps", "--format", "{{.Id}}", "--filter", label, check=False)
        for pod in pods.stdout.split():
            self("pod", "rm", "--force", "--time", "0", pod, check=False)
        containers = self("ps", "--all", "--format", "{{.ID}}", "--filter", label, check=False)
        for container in containers.stdout.split():
            self("rm", "--force", "--volumes", "--time", "0", container, check=False)
        for kind in ("network", "volume"):
            listed = self(kind, "ls", "--format", "{{.Name}}", "--filter", label, check=False)
            for name in listed.stdout.split():
                self(kind, "rm", "--force", name, check=False)
