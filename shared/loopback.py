"""Keeping TFF's executor service on loopback, with a port of its own.

`worker_binary` listens on `[::]:PORT` (every interface, no TLS, no
authentication) and sets SO_REUSEPORT; it has no option to change either:
`worker_binary --helpfull` lists only its port, message size and
concurrency, and TFF's source (`cc/simulation/worker_main.cc`) hard-codes
insecure credentials and `[::]`. Every `worker_binary` fedcompose starts,
the workers' and the coordinator's own server executor, therefore runs with a small
`LD_PRELOAD` shim (`loopback_shim.c`) that turns its wildcard bind into a
loopback bind and ignores SO_REUSEPORT. The shim is compiled from source on
install (`deploy/bootstrap.sh` runs `python -m shared.loopback --build`) into
the virtualenv; a missing shim is a one-line error, never a silently exposed
port. After start, `check_confined` reads what the process actually listens on
from /proc, so a shim that did not take effect is caught too.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from shared.errors import FedcomposeError

SOURCE = Path(__file__).with_name("loopback_shim.c")
SHIM_NAME = "fedcompose-loopback.so"
FEATURES = b"fedcompose-shim-features: loopback-bind exclusive-port uid-filter-v1"
"""The marker `loopback_shim.c` carries for what it does."""
ENV_OVERRIDE = "FEDCOMPOSE_LOOPBACK_SHIM"
"""Path of the shim to use instead of the virtualenv's (packagers, tests)."""


class ConfinementError(FedcomposeError):
    """The executor service could not be confined to loopback; nothing was exposed."""


def shim_path() -> Path:
    """Where the built shim lives: inside the running virtualenv."""
    override = os.environ.get(ENV_OVERRIDE)
    if override:
        return Path(override)
    return Path(sys.prefix) / "lib" / "fedcompose" / SHIM_NAME


def require_shim() -> Path:
    """The shim, or a one-line error saying how to build it."""
    path = shim_path()
    if not path.is_file():
        raise ConfinementError(
            f"the loopback shim {path} is missing, so TFF's executor service would listen "
            "on every interface; build it with `deploy/bootstrap.sh` (or "
            f"`{sys.executable} -m shared.loopback --build`, which needs a C compiler)"
        )
    if not _has_features(path):
        raise ConfinementError(
            f"the loopback shim {path} is an older build that lets other users of this machine "
            "connect to the executor service; rebuild it with `deploy/bootstrap.sh` (or "
            f"`{sys.executable} -m shared.loopback --build`)"
        )
    return path


def _has_features(path: Path) -> bool:
    try:
        return FEATURES in path.read_bytes()
    except OSError:
        return False


def environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment to start `worker_binary` in: the shim preloaded."""
    env = dict(os.environ if base is None else base)
    shim = str(require_shim())
    if any(c in shim for c in " \t\n:"):
        # ld.so splits LD_PRELOAD at spaces and colons, with no escaping: such a
        # path would be ignored (ld.so only prints a warning), and every executor
        # TFF starts on its own (not checked after start) would listen on `[::]`.
        raise ConfinementError(
            f"the loopback shim's path {shim!r} holds a space or ':', which LD_PRELOAD "
            f"cannot carry; set {ENV_OVERRIDE} to a copy of it at a path without them, "
            "or move the virtualenv"
        )
    preload = env.get("LD_PRELOAD", "")
    if shim not in preload.split():
        env["LD_PRELOAD"] = f"{shim} {preload}".strip()
    return env


def confine_children() -> None:
    """Preloads the shim into every child this process starts from now on.

    For `worker_binary`s started by TFF itself (its local execution context),
    which take this process's environment. The shim acts only in processes
    named `worker_binary`; every other child is left as it is.
    """
    os.environ.update(environment())


def build(dest: Path | None = None, compiler: str | None = None) -> Path:
    """Compiles the shim into `dest` (default: the virtualenv) unless it is up to date."""
    dest = dest or shim_path()
    if dest.is_file() and dest.stat().st_mtime >= SOURCE.stat().st_mtime and _has_features(dest):
        return dest
    cc = compiler or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise ConfinementError(
            "no C compiler (cc) to build the loopback shim; install one "
            "(e.g. `apt-get install gcc`) and run deploy/bootstrap.sh again"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".shim-", suffix=".so", dir=dest.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [cc, "-shared", "-fPIC", "-O2", "-Wall", "-o", tmp, str(SOURCE), "-ldl"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            first = (result.stderr.strip().splitlines() or ["no output"])[0]
            raise ConfinementError(f"building the loopback shim with {cc} failed: {first}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for entry in fd_dir.iterdir():
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _parse_address(hex_address: str) -> tuple[str, int]:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    if len(raw) == 4:
        address = ipaddress.IPv4Address(raw[::-1])
    else:  # four little-endian 32-bit words
        words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]
        address = ipaddress.IPv6Address(b"".join(words))
    return str(address), int(port, 16)


def listening_addresses(pid: int) -> list[tuple[str, int]]:
    """Every TCP (address, port) process `pid` listens on, in its own network namespace."""
    inodes = _socket_inodes(pid)
    found = []
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append(_parse_address(fields[1]))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def check_confined(pid: int, what: str) -> None:
    """Raises unless process `pid` listens on loopback addresses only."""
    try:
        exposed = [(a, p) for a, p in listening_addresses(pid) if not is_loopback(a)]
    except OSError as e:
        raise ConfinementError(f"cannot check what {what} listens on: {e}") from None
    if exposed:
        where = ", ".join(f"[{a}]:{p}" if ":" in a else f"{a}:{p}" for a, p in exposed)
        raise ConfinementError(
            f"{what} listens on {where}, not on loopback only: the loopback shim "
            f"{shim_path()} did not take effect; it was stopped"
        )


def main(argv: list[str]) -> int:
    if argv != ["--build"]:
        print("usage: python -m shared.loopback --build", file=sys.stderr)
        return 2
    try:
        print(build())
    except FedcomposeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
