"""Builds fedcompose's container image, or reuses it when its inputs are unchanged.

    python -m deploy.container.build [--base IMAGE] [--engine podman|docker]

1. The wheelhouse: `pip download --no-deps -r deploy/requirements.lock` on the
   host, into the cache (`~/.cache/fedcompose/wheelhouse-<hash of the lock>`),
   once per lock. The lock's two source-only packages (jax, SQLAlchemy) are
   made into wheels there too (pure Python), so the build compiles nothing.
2. The loopback shim, compiled with the host's C compiler (`shared.loopback`).
3. A build context of the Containerfile, the sources, the shim and (hard links
   to) the wheelhouse, then `podman build` with the base as a build argument.

The image is tagged `localhost/fedcompose:<content hash>`, the hash covering
the Containerfile, the lock, every source file that goes into the image, the
shim and the base image's ID: when the tag exists, nothing is built. Prints the
image name on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = Path(__file__).with_name("Containerfile")
LOCK = ROOT / "deploy" / "requirements.lock"
DEFAULT_BASE = "docker.io/library/python:3.11-slim"
REPOSITORY = "localhost/fedcompose"
PIP_VERSION = "23.2.1"
"""The pip that installs the wheelhouse inside the build (run from its wheel)."""
PACKAGES = ("fedcompose", "coordinator", "client_worker", "shared", "deploy")
EXCLUDED = ("deploy/kubernetes",)
"""Not in the image: editing the manifests does not rebuild it."""
UID = 10001

Log = Callable[[str], None]


class BuildError(Exception):
    """The image could not be built; the message says why and what to do."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(base) / "fedcompose"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _run(args: list[str], what: str, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    except FileNotFoundError:
        raise BuildError(f"{what}: {args[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise BuildError(f"{what} took longer than {timeout:g}s") from None
    if result.returncode != 0:
        lines = [
            line
            for line in (result.stderr or result.stdout).strip().splitlines()
            if "is ignored: it is neither a file nor a directory" not in line
        ]
        raise BuildError(f"{what} failed (exit {result.returncode}): {' | '.join(lines[-4:])}")
    return result


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """One builder at a time per cache (test processes run side by side)."""
    fd = os.open(cache_dir() / f".{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def image_exists(image: str, engine: str = "podman") -> bool:
    try:
        result = subprocess.run(
            [engine, "image", "inspect", "--format", "{{.Id}}", image],
            capture_output=True,
            timeout=60,
        )
    except FileNotFoundError:
        raise BuildError(
            f"{engine} is not installed; install it (apt-get install podman)"
        ) from None
    return result.returncode == 0


def _image_id(image: str, engine: str) -> str:
    return _run(
        [engine, "image", "inspect", "--format", "{{.Id}}", image], f"inspecting {image}", 60
    ).stdout.strip()


def _lock_hash() -> str:
    return hashlib.sha256(LOCK.read_bytes()).hexdigest()[:16]


def wheelhouse(log: Log = _stderr) -> Path:
    """Every wheel of the lock, plus pip's own, downloaded once per lock."""
    target = cache_dir() / f"wheelhouse-{_lock_hash()}"
    if (target / ".complete").is_file():
        return target
    with locked("wheelhouse"):
        if (target / ".complete").is_file():
            return target
        started = time.monotonic()
        log(f"downloading the wheelhouse into {target} (once per lock)")
        shutil.rmtree(target, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".wheelhouse-", dir=cache_dir()))
        try:
            pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
            _run(
                [
                    *pip,
                    "download",
                    "--quiet",
                    "--progress-bar",
                    "off",
                    "--no-deps",
                    "-r",
                    str(LOCK),
                    "-d",
                    str(tmp / "wheels"),
                ],
                "pip download of deploy/requirements.lock",
                3600,
            )
            _run(
                [
                    *pip,
                    "download",
                    "--quiet",
                    "--no-deps",
                    f"pip=={PIP_VERSION}",
                    "-d",
                    str(tmp / "tools"),
                ],
                f"pip download of pip=={PIP_VERSION}",
                600,
            )
            sources = [p for p in (tmp / "wheels").iterdir() if not p.name.endswith(".whl")]
            if sources:
                # Pure-Python wheels (SQLAlchemy without its optional C speedups),
                # so the image builds no code and the wheels suit any base.
                env = dict(os.environ, DISABLE_SQLALCHEMY_CEXT="1")
                _run(
                    [*pip, "wheel", "--quiet", "--no-deps", "-w", str(tmp / "wheels")]
                    + [str(p) for p in sources],
                    "pip wheel of the lock's source-only packages "
                    + ", ".join(p.name for p in sources),
                    1800,
                    env=env,
                )
                for p in sources:
                    p.unlink()
            (tmp / ".complete").write_text(f"{time.monotonic() - started:.0f}s\n")
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log(f"wheelhouse ready in {time.monotonic() - started:.0f}s")
    return target


def source_files() -> list[Path]:
    """The project files the image holds, relative to the repository."""
    found = [Path("pyproject.toml")]
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*")):
            rel = path.relative_to(ROOT)
            if (
                path.is_file()
                and "__pycache__" not in rel.parts
                and not rel.as_posix().startswith(EXCLUDED)
                and path.suffix not in (".pyc", ".so")
            ):
                found.append(rel)
    return found


def content_hash(base_id: str) -> str:
    digest = hashlib.sha256()
    digest.update(f"base {base_id}\nuid {UID}\npip {PIP_VERSION}\n".encode())
    for label, path in (("Containerfile", CONTAINERFILE), ("lock", LOCK)):
        digest.update(f"{label} {hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    for rel in source_files():
        data = (ROOT / rel).read_bytes()
        digest.update(f"{rel.as_posix()} {hashlib.sha256(data).hexdigest()}\n".encode())
    return digest.hexdigest()[:16]


def _link_tree(source: Path, dest: Path) -> None:
    """Hard links (the wheelhouse is about 1 GB), copies across file systems."""
    dest.mkdir(parents=True)
    for path in source.iterdir():
        if path.name.startswith("."):
            continue
        try:
            os.link(path, dest / path.name)
        except OSError:
            shutil.copy2(path, dest / path.name)


def _context(directory: Path, wheels: Path) -> None:
    from shared import loopback

    shutil.copy2(CONTAINERFILE, directory / "Containerfile")
    _link_tree(wheels / "wheels", directory / "wheels")
    _link_tree(wheels / "tools", directory / "tools")
    (pip_wheel,) = (directory / "tools").glob("pip-*.whl")
    pip_wheel.rename(directory / "tools" / "pip.whl")
    shutil.copy2(LOCK, directory / "tools" / "requirements.lock")
    try:
        loopback.build(directory / "shim" / loopback.SHIM_NAME)
    except loopback.ConfinementError as e:
        raise BuildError(str(e)) from None
    for rel in source_files():
        (directory / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, directory / "src" / rel)


def ensure_image(base: str = DEFAULT_BASE, engine: str = "podman", log: Log = _stderr) -> str:
    """The image for these inputs: the existing one, or one built now."""
    if not image_exists(base, engine):
        log(f"pulling the base image {base}")
        try:
            _run([engine, "pull", "--quiet", base], f"{engine} pull {base}", 1800)
        except BuildError as e:
            raise BuildError(
                f"the base image {base} is not here and cannot be pulled ({e}); pull or load it, "
                "or pass --base IMAGE (any image with Python 3.11 on PATH)"
            ) from None
    image = f"{REPOSITORY}:{content_hash(_image_id(base, engine))}"
    if image_exists(image, engine):
        return image
    with locked("image"):
        if image_exists(image, engine):
            return image
        wheels = wheelhouse(log)
        started = time.monotonic()
        log(f"building {image} on {base}")
        with tempfile.TemporaryDirectory(prefix=".context-", dir=cache_dir()) as tmp:
            _context(Path(tmp), wheels)
            args = [engine, "build", "--file", str(Path(tmp) / "Containerfile")]
            if engine == "podman":
                # OCI images drop HEALTHCHECK; the docker format keeps it.
                args += ["--format", "docker", "--pull=never"]
            _run(
                [
                    *args,
                    "--build-arg",
                    f"BASE={base}",
                    "--build-arg",
                    f"UID={UID}",
                    "--tag",
                    image,
                    tmp,
                ],
                f"{engine} build",
                3600,
            )
        log(f"built {image} in {time.monotonic() - started:.0f}s")
    return image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.container.build",
        description="Build fedcompose's image (or reuse the one built from the same inputs) "
        "and print its name.",
    )
    parser.add_argument("--base", default=DEFAULT_BASE, help=f"base image (default {DEFAULT_BASE})")
    parser.add_argument("--engine", default="podman", choices=("podman", "docker"))
    parser.add_argument("--tag", help="also tag the image with this name (e.g. for a registry)")
    args = parser.parse_args(argv)
    try:
        image = ensure_image(args.base, args.engine)
        if args.tag:
            _run([args.engine, "tag", image, args.tag], f"{args.engine} tag", 60)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
