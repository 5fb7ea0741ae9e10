"""A pod's init step: its own TLS kit from the mounted Secrets, and its shard.

    python -m deploy.container.prepare --kit-from /kits/NAME --kit-to /kit
                                       [--wait-for FILE] [--wait-timeout SECONDS]

Kubernetes mounts Secret files owned by root and, with an fsGroup, readable by
the group: `fedcompose` refuses a key that others can read. So the pod's init
container copies its own kit (chosen by the pod's name) into a memory-backed
emptyDir, the key with mode 0600 owned by the pod's user. The worker container
mounts only that copy, never the other sites' kits. With --wait-for it first
waits until the shard is loaded (its manifest exists), so workers applied
before their shards start once the shards arrive.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

KIT_FILES = ("ca.pem", "cert.pem", "key.pem", "kit.json")


class PrepareError(Exception):
    pass


def expand(path: str) -> Path:
    """`$(NAME)` replaced by the environment variable NAME, as Kubernetes does in
    a container's arguments (`podman kube play` leaves them as they are)."""

    def value(match: re.Match) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise PrepareError(f"{path}: the environment has no {name}")
        return os.environ[name]

    return Path(re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value, path))


def copy_kit(source: Path, dest: Path) -> None:
    missing = [name for name in KIT_FILES if not (source / name).is_file()]
    if missing:
        raise PrepareError(
            f"no kit at {source} (missing {', '.join(missing)}): create the Secret of this "
            "site from its kit (`kubectl create secret generic fedcompose-kit-NAME "
            "--from-file=kits/NAME/`, see docs/containers.md)"
        )
    dest.mkdir(parents=True, exist_ok=True)
    for name in KIT_FILES:
        target = dest / name
        tmp = dest / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write((source / name).read_bytes())
        os.chmod(tmp, 0o600 if name == "key.pem" else 0o644)
        os.replace(tmp, target)


def wait_for(path: Path, timeout: float, interval: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    announced = 0.0
    while not path.exists():
        now = time.monotonic()
        if now >= deadline:
            raise PrepareError(
                f"{path} did not appear within {timeout:g}s: load this pod's shard onto the "
                "shards volume (see docs/containers.md, 'Load the shards')"
            )
        if now - announced >= 60:
            print(f"waiting for {path} (the shard is not loaded yet)", flush=True)
            announced = now
        time.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.container.prepare")
    parser.add_argument("--kit-from", help="this site's kit, as mounted from a Secret")
    parser.add_argument("--kit-to", type=Path, help="where to copy it, the key with mode 0600")
    parser.add_argument("--wait-for", type=Path, help="a file to wait for first (the shard)")
    parser.add_argument("--wait-timeout", type=float, default=3600.0)
    args = parser.parse_args(argv)
    if (args.kit_from is None) != (args.kit_to is None):
        parser.error("--kit-from and --kit-to go together")
    try:
        if args.wait_for is not None:
            wait_for(args.wait_for, args.wait_timeout)
        if args.kit_from is not None:
            copy_kit(expand(args.kit_from), args.kit_to)
            print(f"kit {args.kit_from} copied to {args.kit_to}", flush=True)
    except (PrepareError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
