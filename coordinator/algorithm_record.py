"""Which learning process a run directory was trained with, when the user composed it.

fedcompose's own algorithm is recorded by its settings (`config.toml`, checked
on resume). A process composed in Python has no settings: `algorithm.json`
records its name and a digest of its types (state, client data, result), so
that resuming the directory with another process, or with fedcompose's own
blocks, is refused in one line instead of failing on a checkpoint that does
not fit or, worse, fitting one by chance.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from coordinator.rounds.prepared import PreparedAlgorithm
from shared import files
from shared.errors import RunDirError

FILE = "algorithm.json"


def record(algorithm: PreparedAlgorithm) -> dict | None:
    """What `algorithm.json` holds for this algorithm (None: fedcompose's own)."""
    if not algorithm.user_defined:
        return None
    comps = algorithm.computations
    types = [
        str(comps["initialize"].result_type),
        str(comps["train.up_to_merge"].parameter_type),
        str(comps["train.after_merge"].result_type),
    ]
    digest = hashlib.sha256("\n".join(types).encode()).hexdigest()[:16]
    return {"kind": "user", "description": algorithm.describe(), "types_digest": digest}


def _read(run_path: Path) -> dict | None:
    path = run_path / FILE
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RunDirError(f"{path} cannot be read ({e}); use a new --run-dir") from None
    if not isinstance(value, dict):
        raise RunDirError(f"{path} is corrupt; use a new --run-dir")
    return value


def check(run_path: Path, now: dict | None, resuming: bool) -> None:
    """Refuses to resume a run with another algorithm than it was trained with."""
    if not resuming:
        return
    before = _read(run_path)
    if before == now or (before is not None and now is not None and _same(before, now)):
        return
    if before is None:
        raise RunDirError(
            f"{run_path} was trained with fedcompose's own blocks (its config.toml), not with "
            f"{now['description'] if now else 'this process'}; use a new run directory"
        )
    if now is None:
        raise RunDirError(
            f"{run_path} was trained with a learning process composed in Python "
            f"({before.get('description')}); resume it from Python with that process, or use "
            "a new run directory"
        )
    raise RunDirError(
        f"{run_path} was trained with another learning process ({before.get('description')}, "
        f"types {before.get('types_digest')}) than this one ({now['description']}, types "
        f"{now['types_digest']}); resume it with that process, or use a new run directory"
    )


def recorded(run_path: Path) -> bool:
    """Whether the run directory was trained with a process composed in Python."""
    return (run_path / FILE).exists()


def _same(before: dict, now: dict) -> bool:
    # Processes of the same types (another learning rate, say) are told apart
    # by the name the user gave them; their serialized graphs are not stable
    # enough across processes to compare.
    return before.get("types_digest") == now.get("types_digest") and before.get(
        "description"
    ) == now.get("description")


def write(run_path: Path, now: dict | None) -> None:
    if now is not None:
        files.write_atomic(run_path / FILE, json.dumps(now, indent=1) + "\n")
