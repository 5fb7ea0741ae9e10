"""Checkpoints of the server state: `checkpoints/round_N/state.npz`, written
aside and renamed into place, the first and newest kept; a resume reads the
newest intact one."""

from __future__ import annotations

import logging
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.run_dir.safe_io import aside_name, writing
from shared import event_loops, files, pause_points
from shared.errors import RunDirError, one_line

log = logging.getLogger("fedcompose.coordinator")

CHECKPOINT_PREFIX = "round_"
UNREADABLE_PREFIX = "unreadable-"
CHECKPOINT_FILE = "state.npz"
CHECKPOINT_FORMAT = "fedcompose-state-1"
"""Named inside every checkpoint: the leaves of the server state, in
`tf.nest.flatten` order, as `leaf_0` ... `leaf_N`."""
_CHECKPOINT = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


class CheckpointStore:
    """The checkpoint part of a `RunDirectory`."""

    checkpoint_dir: Path
    keep_checkpoints: int

    def checkpoint_versions(self) -> list[int]:
        """Rounds that have a checkpoint directory, oldest first."""
        try:
            names = os.listdir(self.checkpoint_dir)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise RunDirError(f"cannot read {files.failure(e, self.checkpoint_dir)}") from None
        found = (_CHECKPOINT.match(name) for name in names)
        return sorted(int(m.group(1)) for m in found if m)

    def latest_checkpoint(self) -> int | None:
        versions = self.checkpoint_versions()
        return versions[-1] if versions else None

    def checkpoint_path(self, round_num: int) -> Path:
        return self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{round_num}"

    def save_checkpoint(self, round_num: int, state: Any) -> None:
        """Saves `state` as the checkpoint of `round_num` (see `save_leaves`)."""
        self.save_leaves(round_num, state_leaves(state))

    def save_leaves(self, round_num: int, leaves: list[np.ndarray]) -> None:
        """Writes a state's leaves (`state_leaves`) into a directory of its
        own beside the target, flushes it to disk and renames it into place:
        a crash or a full disk leaves the previous checkpoints and, at worst,
        a temporary that the next start removes. Then keeps the first and the
        newest ones.

        One uncompressed `.npz` (zip) holds the leaves bit for bit, and zip's
        CRC-32 of each makes a damaged one unreadable rather than wrong. It
        replaced TFF's program-state manager (a SavedModel per checkpoint),
        which cost tens of milliseconds of TensorFlow graph building per
        round for the same arrays."""
        target = self.checkpoint_path(round_num)
        staging = files.temporary_path(self.checkpoint_dir / "staging")
        # Named by its round, and a failure by the path that failed (the
        # directory written aside), not the target that was never written to.
        with writing(f"round {round_num}'s checkpoint", staging):
            try:
                self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
                staging.mkdir()
                arrays = {f"leaf_{i}": leaf for i, leaf in enumerate(leaves)}
                _write_npz(staging / CHECKPOINT_FILE, arrays)
                files.sync_dir(staging)
                pause_points.reached("checkpoint", round_num)
                if target.exists():  # a leftover of an abandoned run past this round
                    files.remove_tree(target)
                os.rename(staging, target)
                files.sync_dir(self.checkpoint_dir)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            self._keep_newest()

    def _keep_newest(self) -> None:
        versions = self.checkpoint_versions()
        keep = {versions[0], *versions[-self.keep_checkpoints :]} if versions else set()
        for version in versions:
            if version not in keep:
                files.remove_tree(self.checkpoint_path(version))

    def restore(self, structure: Any) -> tuple[int, Any] | None:
        """The newest checkpoint that can be read, as (round, state).

        A checkpoint that cannot be read is set aside (renamed
        `unreadable-round_N`) with a warning, and the next older one is tried;
        one that reads but does not have `structure`'s shapes is refused.
        Returns None if there are no checkpoints.
        """
        versions = self.checkpoint_versions()
        unreadable: list[tuple[int, str]] = []
        for version in reversed(versions):
            state, problem = self._load(version, structure)
            if problem is not None:
                unreadable.append((version, problem))
                continue
            for bad, reason in unreadable:
                aside = self._set_aside(bad)
                log.warning(
                    "checkpoint %s cannot be read (%s); resuming from %s, the newest intact "
                    "checkpoint (the unreadable one is kept as %s)",
                    self.checkpoint_path(bad),
                    reason,
                    self.checkpoint_path(version),
                    aside,
                )
            return version, state
        if unreadable:
            version, reason = unreadable[0]
            raise RunDirError(
                f"no checkpoint in {self.checkpoint_dir} can be read (the newest, "
                f"{self.checkpoint_path(version)}: {reason}); use a new --run-dir"
            )
        return None

    def _load(self, version: int, structure: Any) -> tuple[Any, str | None]:
        """(state, None), or (None, why it cannot be read); raises if it reads
        but does not fit `structure`."""
        path = self.checkpoint_path(version)
        if not (path / CHECKPOINT_FILE).exists() and (path / "saved_model.pb").exists():
            return self._load_saved_model(version, structure)
        import tensorflow as tf

        try:
            with np.load(path / CHECKPOINT_FILE, allow_pickle=False) as z:
                kept = str(z["format"]) if "format" in z.files else None
                if kept != CHECKPOINT_FORMAT:
                    raise RunDirError(
                        f"checkpoint {path} is of format {kept!r}, not {CHECKPOINT_FORMAT!r} "
                        "(written by another version of fedcompose); resume it with that "
                        "version, or use a new --run-dir"
                    )
                count = sum(1 for name in z.files if name.startswith("leaf_"))
                loaded = [z[f"leaf_{i}"] for i in range(count)]
        except RunDirError:
            raise
        except FileNotFoundError:
            return None, f"no {CHECKPOINT_FILE}"
        except Exception as e:  # zip, CRC and format errors of a damaged file
            return None, one_line(e)
        wanted = tf.nest.flatten(structure)
        self._check_fit(path, loaded, wanted)
        leaves = [_like(a, b) for a, b in zip(loaded, wanted, strict=True)]
        return tf.nest.pack_sequence_as(structure, leaves), None

    def _load_saved_model(self, version: int, structure: Any) -> tuple[Any, str | None]:
        """A checkpoint of an older run, in TFF's program-state format."""
        import tensorflow as tf
        import tensorflow_federated as tff
        from tensorflow_federated.python.program import file_utils

        path = self.checkpoint_path(version)
        manager = tff.program.FileProgramStateManager(
            str(self.checkpoint_dir), prefix=CHECKPOINT_PREFIX, keep_total=0
        )
        try:
            state = event_loops.run(manager.load(version, structure))
        except Exception as e:  # TF raises many kinds; sorted out below
            try:
                event_loops.run(file_utils.read_saved_model(str(path)))
            except Exception as unreadable:
                return None, one_line(unreadable)
            raise self._misfit(path, one_line(e)) from None
        try:
            loaded, wanted = tf.nest.flatten(state), tf.nest.flatten(structure)
        except (TypeError, ValueError) as e:
            raise self._misfit(path, one_line(e)) from None
        self._check_fit(path, loaded, wanted)
        return state, None

    def _check_fit(self, path: Path, loaded: list, wanted: list) -> None:
        if len(loaded) != len(wanted):
            raise self._misfit(path, f"{len(loaded)} tensors, the model has {len(wanted)}")
        for i, (a, b) in enumerate(zip(loaded, wanted, strict=True)):
            a, b = np.asarray(a), np.asarray(b)
            if a.shape != b.shape or a.dtype != b.dtype:
                raise self._misfit(
                    path,
                    f"tensor {i} is {a.dtype}{list(a.shape)}, "
                    f"the model's is {b.dtype}{list(b.shape)}",
                )

    def _misfit(self, path: Path, reason: str) -> RunDirError:
        return RunDirError(
            f"checkpoint {path} does not fit the configured model and algorithm ({reason}); "
            "use a new --run-dir"
        )

    def _set_aside(self, version: int) -> Path:
        source = self.checkpoint_path(version)
        aside = aside_name(self.checkpoint_dir / f"{UNREADABLE_PREFIX}{source.name}")
        with writing("checkpoints", self.checkpoint_dir):
            os.rename(source, aside)
        return aside


def state_leaves(state: Any) -> list[np.ndarray]:
    """The server state's leaves as arrays of their own: what a checkpoint
    holds, and a copy no later round can change while it is written."""
    import tensorflow as tf

    return [np.array(leaf, copy=True) for leaf in tf.nest.flatten(state)]


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """What `np.savez` writes (uncompressed), flushed to disk. Written here
    because `np.savez` leaves its zip file open when a write fails (a full
    disk), and its clean-up later printed a traceback."""
    with open(path, "wb") as f:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            for name, array in {"format": np.array(CHECKPOINT_FORMAT), **arrays}.items():
                with z.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _like(loaded: np.ndarray, wanted: Any) -> Any:
    """A loaded leaf as the kind of value the fresh state holds there (an
    array, a NumPy scalar or a Python number), so a resumed state is the
    state an uninterrupted run would hand the next round."""
    if isinstance(wanted, np.ndarray):
        return loaded
    if isinstance(wanted, np.generic):
        return loaded[()]
    if isinstance(wanted, bool | int | float):
        return type(wanted)(loaded.item())
    return loaded


_SCALAR_METADATA: Any = None
