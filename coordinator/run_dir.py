"""A run's directory: resolved config, metrics, TensorBoard, plot, checkpoints.

config.toml        the resolved configuration (feed it back with --config)
status.json        running / finished / failed / interrupted, rounds done and checkpointed
trained_on.json    what the run was trained on: shard build, dataset, clients
metrics.csv        one row per round (appended; rewritten only when a new column appears)
metrics.jsonl      the same, one JSON object per round, with per-worker times (appended)
tensorboard/       event files (scalars, written directly as TensorBoard events)
checkpoints/       server state, one `round_N/state.npz` each (written aside, synced, renamed;
                   older runs' TFF SavedModel checkpoints are still read)
metrics.png        loss and accuracy against round
final_model.npz    the final global model weights
logs/              coordinator and worker logs
.lock              held (flock) by the one process that uses the directory

Rules that keep the directory whole, whatever happens to the process:

* One user at a time: `locked` takes an exclusive `flock` on `.lock` for the
  process's life. The kernel drops it when the holder dies, even by SIGKILL,
  so a killed run never leaves the directory stuck; a second coordinator is
  refused before it writes anything.
* Nothing changes before the resume is known to be sound: `plan_resume`
  (settings) and `check_trained_on` (data) only read.
* Every file is replaced in one step (temporary + rename), or appended to
  (metrics): an append that fails is cut back to where it began, and a line a
  crash cut short is repaired at the next start (`prepare_metrics`); a
  temporary a killed writer left is removed at the next start, under the lock.
* The newest checkpoint is the truth a resume continues from; metrics after
  it are dropped, and `status.json` is set from what is on disk when a run
  stops, so it agrees with the checkpoints and metrics.
* A checkpoint that cannot be read (cut short by a crash or a full disk) is
  set aside with a warning and the newest intact one is used; one that reads
  but does not fit the model is refused.
* Every failure to write is one line naming the file (`RunDirError`).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import time
import tomllib
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shared import event_loops, files, pause_points, settings, shard_format
from shared.config import COMMANDS, SECTIONS, RunConfig, resume_conflicts
from shared.errors import RunDirError, UsageError, one_line

log = logging.getLogger("fedcompose.coordinator")

CHECKPOINT_PREFIX = "round_"
LOCK_NAME = ".lock"
UNREADABLE_PREFIX = "unreadable-"
CHECKPOINT_FILE = "state.npz"
CHECKPOINT_FORMAT = "fedcompose-state-1"
"""Named inside every checkpoint: the leaves of the server state, in
`tf.nest.flatten` order, as `leaf_0` ... `leaf_N`."""
_CHECKPOINT = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
# What TFF's own writers leave when killed midway: `<target>_temp<4 digits>`.
_TFF_TEMPORARY = re.compile(rf"^({CHECKPOINT_PREFIX}\d+|metrics\.csv)_temp\d{{4}}$")


def _flatten(prefix: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif isinstance(value, int | float | np.floating | np.integer):
        out[prefix] = float(value)


@contextlib.contextmanager
def _writing(what: str, path: Path) -> Iterator[None]:
    """Turns a failed write (OSError or TensorFlow's file errors) into one
    line naming `path`."""
    try:
        yield
    except RunDirError:
        raise
    except Exception as e:
        if not files.is_file_error(e):
            raise
        raise RunDirError(f"cannot write {what}: {files.failure(e, path)}") from None


# --- the lock ------------------------------------------------------------------------


@dataclasses.dataclass
class _Held:
    fd: int
    count: int


_held: dict[str, _Held] = {}


@contextlib.contextmanager
def locked(directory: Path, command: str) -> Iterator[list[Path]]:
    """Makes `directory` (if needed) and holds its lock while the block runs.

    Re-entrant within a process (`run` holds it while its coordinator takes
    it again). On first taking it, removes the temporaries that killed
    writers left, and yields their paths (for the caller to log once its
    logging is set up). Raises `RunDirError` if the path is not a usable
    directory or another process holds the lock.
    """
    key = os.path.realpath(directory)
    fresh = key not in _held and _is_new(directory)
    _make_directory(directory)
    removed: list[Path] = []
    if key in _held:
        _held[key].count += 1
    else:
        _refuse_foreign(directory)
        _held[key] = _Held(_lock(directory, command), 1)
        removed = RunDirectory(directory).remove_temporaries()
    failed = True
    try:
        yield removed
        failed = False
    finally:
        held = _held[key]
        held.count -= 1
        if held.count == 0:
            del _held[key]
            if failed and fresh:
                _remove_if_unused(directory)
            os.close(held.fd)  # releases the lock


def _is_new(directory: Path) -> bool:
    """Whether `directory` does not exist yet or is empty (as `runs/<time>` is)."""
    try:
        return not any(directory.iterdir())
    except FileNotFoundError:
        return True
    except OSError:
        return False


_BEFORE_USE = frozenset({LOCK_NAME, "logs"})
"""What a run directory holds before the command that made it used it."""


def _remove_if_unused(directory: Path) -> None:
    """Removes a run directory that this command made and then refused or
    stopped before recording anything in it: a new directory left holding only
    `.lock` and `logs/` looked like a run (`train --clients-per-round 1e9`
    refused after connecting left them). Under the lock, before it is dropped."""
    try:
        others = [directory / name for name in os.listdir(directory) if name not in _BEFORE_USE]
        # An empty directory (`shards/` after a failed build removed its shards) holds nothing.
        if all(p.is_dir() and not p.is_symlink() and not any(p.iterdir()) for p in others):
            shutil.rmtree(directory)
    except OSError:
        pass  # left as it is: it holds nothing a later start trips on


def setup_logs(directory: Path, name: str, verbose: bool, command: str) -> None:
    """Logging to the terminal and to `logs/<name>` in the run directory."""
    from shared import logs

    try:
        logs.setup(verbose=verbose, log_file=directory / "logs" / name, name=command)
    except UsageError as e:  # the log file cannot be opened: a run directory problem
        raise RunDirError(str(e)) from None


def _make_directory(directory: Path) -> None:
    try:
        is_file = directory.exists() and not directory.is_dir()
    except OSError as e:  # a parent we may not search
        raise RunDirError(f"--run-dir {directory} cannot be used: {files.failure(e)}") from None
    if is_file:
        raise RunDirError(f"--run-dir {directory} exists and is not a directory; give a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"--run-dir {directory} cannot be created: {files.failure(e)}") from None


RUN_ENTRIES = frozenset(
    {
        LOCK_NAME,
        "config.toml",
        "status.json",
        "trained_on.json",
        "workers.json",
        "metrics.csv",
        "metrics.jsonl",
        "metrics.png",
        "final_model.npz",
        "tensorboard",
        "checkpoints",
        "logs",
        "shards",
    }
)
"""What a run keeps in its directory (and nothing else is needed to call it one)."""


def _refuse_foreign(directory: Path) -> None:
    """Refuses a directory that holds other things and no run (`--run-dir .`,
    `--run-dir ~`): a run would overwrite a config.toml or metrics.csv of
    someone else's there, and its start-up sweep of temporaries would search
    (and clean) the whole tree below it. A directory that a fedcompose
    command ever locked has `.lock`; an empty one, or one holding only what a
    run keeps, is a run's too."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return  # taking the lock says what is wrong, naming the file
    if LOCK_NAME in entries:
        return
    foreign = sorted(
        name
        for name in entries
        if name not in RUN_ENTRIES
        and not files.is_temporary_name(name)
        and not _TFF_TEMPORARY.match(name)
    )
    if foreign:
        shown = ", ".join(foreign[:3]) + (
            f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        )
        raise RunDirError(
            f"--run-dir {directory} is not a fedcompose run directory (it holds {shown}); "
            "give a new or empty directory"
        )


def _lock(directory: Path, command: str) -> int:
    path = directory / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise RunDirError(f"--run-dir {directory} cannot be used: {files.failure(e)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise RunDirError(
            f"--run-dir {directory} is in use by another fedcompose ({holder}); wait for it "
            "to end or stop it, or choose another --run-dir"
        ) from None
    except OSError as e:
        os.close(fd)
        raise RunDirError(
            f"--run-dir {directory}: cannot lock {path} ({e.strerror}); use a run directory "
            "on a local file system"
        ) from None
    since = datetime.datetime.now().isoformat(timespec="seconds")
    holder = f"fedcompose {command}, pid {os.getpid()} on {socket.gethostname()}, since {since}"
    # Who holds it, for the refusal message; not needed for the lock itself.
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode() + b"\n", 0)
    return fd


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 300, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "pid unknown"


# --- what a run was trained on -------------------------------------------------------


def data_record(manifests: Sequence[shard_format.Manifest]) -> dict:
    """What the workers serve, as `trained_on.json` records it."""
    ids = sorted(c.id for m in manifests for c in m.clients)
    first = manifests[0]
    return {
        "dataset": first.task.dataset,
        "num_classes": first.task.num_classes,
        "build_id": first.build_id,
        "shards_built": first.num_shards,
        "clients": len(ids),
        "client_ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        "clients_per_shard": {
            str(m.shard_index): len(m.clients)
            for m in sorted(manifests, key=lambda m: m.shard_index)
        },
    }


_RECORD_FIELDS: dict[str, type] = {
    "dataset": str,
    "num_classes": int,
    "build_id": str,
    "shards_built": int,
    "clients": int,
    "client_ids_sha256": str,
    "clients_per_shard": dict,
}
"""`data_record`'s fields and their types: a trained_on.json without them
(edited, or another program's) cannot say what a run was trained on."""


def describe_record(record: dict) -> str:
    shards = record.get("clients_per_shard", {})
    return (
        f"build {record.get('build_id')} of {record.get('dataset')} "
        f"({record.get('num_classes')} classes), {record.get('clients')} clients in "
        f"{len(shards)} shard(s) of {record.get('shards_built')}"
    )


def record_differences(before: dict, now: dict) -> list[str]:
    names = {
        "dataset": "dataset",
        "num_classes": "classes",
        "build_id": "build",
        "shards_built": "shards built",
        "clients": "clients",
        "clients_per_shard": "clients per shard",
    }
    found = [
        f"{label} {before.get(key)!r} -> {now.get(key)!r}"
        for key, label in names.items()
        if before.get(key) != now.get(key)
    ]
    if not found and before.get("client_ids_sha256") != now.get("client_ids_sha256"):
        found.append("other client ids")
    return found


# --- deciding how to start, from the directory alone ---------------------------------


@dataclasses.dataclass
class ResumePlan:
    status: dict
    latest: int | None
    """The newest checkpoint by name (it may yet prove unreadable)."""
    finished: bool
    """Finished and nothing left to do at the configured number of rounds."""

    @property
    def resuming(self) -> bool:
        return self.latest is not None


def _compared_settings(config: RunConfig, command: str) -> set[str]:
    """Settings the command takes and therefore can have changed; data
    settings do not describe shards served from --shards-dir (their
    manifests, checked against trained_on.json, do)."""
    names = {f.name for section, f in COMMANDS[command].fields(SECTIONS)}
    if config.data.shards_dir:
        names -= {f.name for f in dataclasses.fields(SECTIONS["data"])}
    return names


def plan_resume(run: RunDirectory, config: RunConfig, command: str) -> ResumePlan:
    """Checks that `config` may continue what `run` holds, reading only.

    Raises `RunDirError` naming every setting that would change the run.
    """
    run.check_layout()
    saved = run.saved_config()
    if saved is not None:
        conflicts = resume_conflicts(saved, config, _compared_settings(config, command))
        if conflicts:
            raise RunDirError(
                f"{run.path} holds a run with other settings ({'; '.join(conflicts)}); "
                f"resume it with its own config (--config {run.config_path}) or use a new "
                "--run-dir"
            )
    status = run.status()
    latest = run.latest_checkpoint()
    finished = (
        latest is not None
        and latest >= config.training.rounds
        and status.get("state") == "finished"
    )
    if latest is not None and not finished and not run.trained_on_path.exists():
        # Without the record, a resume on another build of the data went on
        # without a word, and then recorded that build as the run's.
        if not config.output.accept_unrecorded_data:
            raise RunDirError(
                f"{run.path} has checkpoints (up to round {latest}) but no trained_on.json, the "
                "record of the data it was trained on, so the data cannot be checked: restore "
                "the file, or resume with --accept-unrecorded-data to take the data the workers "
                "serve now as the run's"
            )
        log.warning(
            "%s has no trained_on.json: resuming on the data the workers serve now "
            "(--accept-unrecorded-data), which is recorded as the run's",
            run.path,
        )
    return ResumePlan(status, latest, finished)


def config_to_record(saved: dict | None, config: RunConfig, command: str) -> str:
    """The config.toml to write: this command's settings, and the saved values
    of settings it does not take (`train` resuming a `run` keeps its data)."""
    values = config.to_dict()
    taken = {f.name for _, f in COMMANDS[command].fields(SECTIONS)}
    for section, fields in (saved or {}).items():
        if section not in values or not isinstance(fields, dict):
            continue
        for name, value in fields.items():
            if name in values[section] and name not in taken:
                values[section][name] = value
    return settings.to_toml(
        values, "fedcompose run configuration (resolved: defaults, config file, flags)"
    )


class RunDirectory:
    def __init__(self, path: Path, keep_checkpoints: int = 3):
        self.path = path
        self.keep_checkpoints = keep_checkpoints
        self.config_path = path / "config.toml"
        self.status_path = path / "status.json"
        self.trained_on_path = path / "trained_on.json"
        self.metrics_csv = path / "metrics.csv"
        self.metrics_jsonl = path / "metrics.jsonl"
        self.privacy_jsonl = path / "privacy.jsonl"
        self.tensorboard_dir = path / "tensorboard"
        self.checkpoint_dir = path / "checkpoints"
        self.plot_path = path / "metrics.png"
        self.model_path = path / "final_model.npz"
        self.logs_dir = path / "logs"
        self._csv_fields: list[str] | None = None
        """metrics.csv's header, once read or written."""
        self._tensorboard: Any = None

    # --- reading ---------------------------------------------------------------------

    def check_layout(self) -> None:
        """Refuses a directory whose entries are not what a run writes there
        (a file where a directory belongs, or the reverse), before any write."""
        kept_files = (
            self.config_path,
            self.status_path,
            self.trained_on_path,
            self.metrics_csv,
            self.metrics_jsonl,
            self.privacy_jsonl,
            self.plot_path,
            self.model_path,
        )
        dirs = (self.tensorboard_dir, self.checkpoint_dir, self.logs_dir, self.path / "shards")
        for path, want_dir in [*((p, False) for p in kept_files), *((p, True) for p in dirs)]:
            if path.exists() and path.is_dir() != want_dir:
                raise RunDirError(
                    f"{path} is {'a file' if want_dir else 'a directory'}, where a run keeps "
                    f"{'a directory' if want_dir else 'a file'}; move it away or use a new "
                    "--run-dir"
                )

    def _read_text(self, path: Path, what: str) -> str | None:
        """A file of the run, or None if it does not exist."""
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except UnicodeDecodeError:
            raise RunDirError(
                f"{path} is corrupt (not UTF-8 text); {what}, or use a new --run-dir"
            ) from None
        except OSError as e:
            raise RunDirError(f"cannot read {files.failure(e, path)}") from None

    def saved_config(self) -> dict | None:
        text = self._read_text(self.config_path, "restore it")
        if text is None:
            return None
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise RunDirError(f"{self.config_path} is corrupt ({e}); use a new --run-dir") from None

    def status(self) -> dict:
        """status.json, or {} if it is missing or unreadable (it is rewritten
        from what is on disk whenever a run starts or stops)."""
        try:
            status = json.loads(self.status_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return status if isinstance(status, dict) else {}

    def trained_on(self) -> dict | None:
        text = self._read_text(self.trained_on_path, "delete it to accept the workers as they are")
        if text is None:
            return None
        try:
            record = json.loads(text)
        except ValueError:
            record = None
        if not isinstance(record, dict) or any(
            not isinstance(record.get(key), kind) or isinstance(record.get(key), bool)
            for key, kind in _RECORD_FIELDS.items()
        ):
            raise RunDirError(
                f"{self.trained_on_path} is corrupt; delete it to accept the workers as they "
                "are, or use a new --run-dir"
            )
        return record

    def check_trained_on(self, now: dict, where: str = "the workers serve") -> None:
        """Refuses to resume on data other than the run was trained on."""
        before = self.trained_on()
        if before is None:
            return
        differences = record_differences(before, now)
        if differences:
            raise RunDirError(
                f"{self.path} was trained on {describe_record(before)}, but {where} "
                f"{describe_record(now)} ({'; '.join(differences)}); resume it on the shards "
                "it was trained on, or use a new --run-dir"
            )

    # --- temporaries -----------------------------------------------------------------

    def remove_temporaries(self) -> list[Path]:
        """Removes what killed writers left. Only under the lock: no writer lives."""
        removed = files.remove_stale_temporaries(self.path, recursive=True, writers_may_live=False)
        for directory in (self.path, self.checkpoint_dir):
            with contextlib.suppress(OSError):
                for entry in directory.iterdir():
                    if _TFF_TEMPORARY.match(entry.name):
                        if entry.is_dir() and not entry.is_symlink():
                            shutil.rmtree(entry, ignore_errors=True)
                        else:
                            entry.unlink(missing_ok=True)
                        removed.append(entry)
        return removed

    # --- writing: config, record, status ---------------------------------------------

    def write_config(self, toml_text: str) -> None:
        with _writing("the run's config", self.config_path):
            files.write_atomic(self.config_path, toml_text)

    def write_trained_on(self, record: dict) -> None:
        with _writing("the run's data record", self.trained_on_path):
            files.write_atomic(self.trained_on_path, json.dumps(record, indent=1) + "\n")

    def write_status(self, **fields: Any) -> None:
        """Updates status.json. A new state drops the last one's error and
        final evaluation. On a full disk, where no temporary can be written,
        the file is overwritten in place rather than left saying `running`."""
        status = self.status()
        if "state" in fields:
            status.pop("error", None)
            if fields["state"] == "running":
                status.pop("final_eval", None)
        status.update(fields, updated_at=time.time())
        text = json.dumps(status, indent=1) + "\n"
        try:
            files.write_atomic(self.status_path, text)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT) and self._overwrite_status(text):
                return
            raise RunDirError(f"cannot write the run's status: {files.failure(e)}") from None

    def _overwrite_status(self, text: str) -> bool:
        """Writes status.json in place (no new file, so usually no new disk
        blocks); trailing spaces pad it to its old length, which JSON ignores."""
        try:
            fd = os.open(self.status_path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            data = text.encode()
            old = os.fstat(fd).st_size
            os.pwrite(fd, data + b" " * max(0, old - len(data)), 0)
            os.fsync(fd)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def progress_on_disk(self) -> dict:
        """Rounds recorded and checkpointed, as the files say."""
        rows = self.metrics()
        return {
            "completed_rounds": max((int(r["round"]) for r in rows), default=0),
            "checkpoint_round": self.latest_checkpoint() or 0,
        }

    def note_stopped(self, state: str, error: str | None = None) -> None:
        """Records how a run stopped, with its progress as the files say it;
        never raises (the reason it stopped matters more)."""
        fields: dict[str, Any] = {"state": state}
        if error:
            fields["error"] = error
        try:
            fields.update(self.progress_on_disk())
        except Exception as e:  # a damaged directory must not hide why we stop
            log.debug("cannot read progress: %s", e)
        try:
            self.write_status(**fields)
        except RunDirError as e:
            log.warning("%s", e)

    # --- checkpoints -----------------------------------------------------------------

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
        with _writing(f"round {round_num}'s checkpoint", staging):
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
        aside = self.checkpoint_dir / f"{UNREADABLE_PREFIX}{source.name}"
        n = 1
        while aside.exists():
            n += 1
            aside = self.checkpoint_dir / f"{UNREADABLE_PREFIX}{source.name}.{n}"
        with _writing("checkpoints", self.checkpoint_dir):
            os.rename(source, aside)
        return aside

    # --- metrics ---------------------------------------------------------------------

    def record_round(self, row: dict) -> None:
        """Appends one round's metrics to the CSV, the JSONL and TensorBoard.

        metrics.jsonl, written after the CSV, is what says a round is
        recorded (`progress_on_disk`); TensorBoard's events are buffered and
        reach the disk at `flush_tensorboard` (the writer calls it about once
        a second) or `close`."""
        round_num = int(row["round"])
        scalars: dict[str, float] = {}
        _flatten("", {k: v for k, v in row.items() if k != "round"}, scalars)
        with _writing("metrics", self.metrics_csv):
            self._append_csv({"round": round_num, **scalars})
        with _writing("metrics", self.metrics_jsonl):
            _append(self.metrics_jsonl, (json.dumps(row) + "\n").encode())
        with _writing("TensorBoard events", self.tensorboard_dir):
            self._tensorboard_event(round_num, scalars)

    def _append_csv(self, flat: dict) -> None:
        """One row, appended; the file is rewritten only when the row has a
        column the header lacks (the first evaluation, a worker lost)."""
        if self._csv_fields is None:
            self._csv_fields = _csv_header(self.metrics_csv)
        fields = self._csv_fields
        new = sorted(k for k in flat if k not in fields)
        if not fields or new:
            fields = [*fields] if fields else ["round"]
            fields += [k for k in new if k not in fields]
            rows = _csv_rows(self.metrics_csv) if self._csv_fields else []
            self._write_csv(fields, [*rows, flat])
            return
        text = io.StringIO()
        csv.DictWriter(text, fieldnames=fields).writerow(flat)
        _append(self.metrics_csv, text.getvalue().encode())

    def _write_csv(self, fields: list[str], rows: list[dict]) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=fields, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        files.write_atomic(self.metrics_csv, text.getvalue())
        self._csv_fields = fields

    def _tensorboard_event(self, round_num: int, scalars: dict[str, float]) -> None:
        from tensorboard.compat.proto import (
            event_pb2,
            summary_pb2,
            tensor_pb2,
            tensor_shape_pb2,
            types_pb2,
        )

        global _SCALAR_METADATA
        if _SCALAR_METADATA is None:
            _SCALAR_METADATA = summary_pb2.SummaryMetadata(
                plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
                data_class=summary_pb2.DATA_CLASS_SCALAR,
            )

        if self._tensorboard is None:
            from tensorboard.summary.writer.record_writer import RecordWriter

            self.tensorboard_dir.mkdir(parents=True, exist_ok=True)
            name = (
                f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                f"{os.getpid()}.fedcompose"
            )
            self._tensorboard = RecordWriter(open(self.tensorboard_dir / name, "ab"))  # noqa: SIM115
            first = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
            self._tensorboard.write(first.SerializeToString())
        # As tf.summary.scalar writes them (a float32 tensor, the scalars plugin), so
        # that tools reading TFF's events (`Tensors`, not legacy `Scalars`) read these.
        values = [
            summary_pb2.Summary.Value(
                tag=k,
                tensor=tensor_pb2.TensorProto(
                    dtype=types_pb2.DT_FLOAT,
                    tensor_shape=tensor_shape_pb2.TensorShapeProto(),
                    float_val=[v],
                ),
                metadata=_SCALAR_METADATA,
            )
            for k, v in scalars.items()
        ]
        event = event_pb2.Event(
            wall_time=time.time(), step=round_num, summary=summary_pb2.Summary(value=values)
        )
        self._tensorboard.write(event.SerializeToString())

    def flush_tensorboard(self) -> None:
        if self._tensorboard is not None:
            with _writing("TensorBoard events", self.tensorboard_dir):
                self._tensorboard.flush()

    def close(self) -> None:
        """Flushes and closes the TensorBoard event file."""
        writer, self._tensorboard = self._tensorboard, None
        if writer is not None:
            with _writing("TensorBoard events", self.tensorboard_dir):
                writer.close()

    def prepare_metrics(self, checkpoint_round: int) -> None:
        """Brings the metrics files to the rounds a run continuing after
        `checkpoint_round` builds on: damaged lines of metrics.jsonl repaired
        (`repair_metrics_jsonl`), rows after the checkpoint dropped (they are
        run again), and metrics.csv rebuilt from metrics.jsonl when it cannot
        be read or holds other rounds (a row a crash cut short, rows after
        the checkpoint)."""
        self.repair_metrics_jsonl(checkpoint_round)
        if checkpoint_round or self.metrics_jsonl.exists():
            self.truncate_metrics_after(checkpoint_round)
        if self.repair_metrics_csv() is None and self.metrics_csv.exists():
            rows = self.metrics()
            try:
                data = self.metrics_csv.read_bytes()
            except OSError as e:
                raise RunDirError(f"cannot read {files.failure(e, self.metrics_csv)}") from None
            in_csv = [int(r["round"]) for r in _csv_rows(self.metrics_csv)]
            if in_csv != [r["round"] for r in rows] or not data.endswith(b"\n"):
                with _writing("metrics", self.metrics_csv):
                    self._rebuild_csv(rows)
        self._csv_fields = None

    def _rebuild_csv(self, rows: list[dict]) -> None:
        flat = []
        for row in rows:
            scalars: dict[str, float] = {}
            _flatten("", {k: v for k, v in row.items() if k != "round"}, scalars)
            flat.append({"round": row["round"], **scalars})
        fields = ["round"]
        for row in flat:
            fields += sorted(k for k in row if k not in fields)
        self._write_csv(fields, flat)

    def repair_metrics_csv(self) -> Path | None:
        """Rebuilds metrics.csv from metrics.jsonl if it cannot be read (cut
        short, edited, not text, a row without a round). The unreadable file
        is kept aside; returns where, or None if there was nothing to repair."""
        try:
            with open(self.metrics_csv, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f)
                rounds = [int(row["round"]) for row in reader]
                if "round" not in (reader.fieldnames or []) or rounds != sorted(rounds):
                    raise ValueError("no round column, or rounds out of order")
            return None
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError, csv.Error) as e:
            problem = one_line(e)
        except OSError as e:
            raise RunDirError(f"cannot read {files.failure(e, self.metrics_csv)}") from None
        aside = _aside_name(self.path / f"{UNREADABLE_PREFIX}{self.metrics_csv.name}")
        rows = self.metrics()
        with _writing("metrics", self.metrics_csv):
            os.replace(self.metrics_csv, aside)
            self._rebuild_csv(rows)
        log.warning(
            "%s cannot be read (%s); rebuilt it from %s (%d rounds), the unreadable one is "
            "kept as %s",
            self.metrics_csv,
            problem,
            self.metrics_jsonl.name,
            len(rows),
            aside,
        )
        return aside

    def repair_metrics_jsonl(self, checkpoint_round: int) -> Path | None:
        """Repairs lines of metrics.jsonl that are not a round's row (cut
        short by a crash, damaged): they were dropped without a word, and
        the round went missing from metrics.jsonl and the plot while
        metrics.csv and status.json had it. The file as it was is kept aside
        and each such round is rebuilt from its metrics.csv row (the figures
        only CSV holds: no lists, numbers as floats, marked `rebuilt_from`);
        a round metrics.csv lacks is dropped with a warning when it comes
        after the checkpoint (it is run again), and refused otherwise.
        Returns where the damaged file is kept, or None."""
        try:
            data = self.metrics_jsonl.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise RunDirError(f"cannot read {files.failure(e, self.metrics_jsonl)}") from None
        rows: list[dict] = []
        damaged: list[tuple[int, int]] = []  # (line number, the round it should hold)
        for number, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            row = _jsonl_row(line)
            if row is None:
                damaged.append((number, (rows[-1]["round"] if rows else 0) + 1 + len(damaged)))
            else:
                rows.append(row)
        if not damaged:
            return None
        recorded = {r["round"] for r in rows}
        from_csv = {int(r["round"]): r for r in _csv_rows(self.metrics_csv, tolerant=True)}
        rebuilt, dropped = [], []
        for number, round_num in damaged:
            if round_num in recorded:
                continue  # a stray line: the round is there
            if round_num in from_csv:
                rows.append(_unflatten(from_csv[round_num]))
                rebuilt.append(round_num)
            elif round_num > checkpoint_round:
                dropped.append(round_num)
            else:
                raise RunDirError(
                    f"{self.metrics_jsonl} line {number} is damaged and round {round_num} "
                    f"cannot be rebuilt (metrics.csv does not hold it); restore the file or "
                    "delete that line, or use a new --run-dir"
                )
        aside = _aside_name(self.path / f"{UNREADABLE_PREFIX}{self.metrics_jsonl.name}")
        rows.sort(key=lambda r: r["round"])
        with _writing("metrics", self.metrics_jsonl):
            shutil.copyfile(self.metrics_jsonl, aside)
            files.write_atomic(self.metrics_jsonl, "".join(json.dumps(r) + "\n" for r in rows))
        log.warning(
            "%s has %d damaged line(s) (line %s); %s; the damaged file is kept as %s",
            self.metrics_jsonl,
            len(damaged),
            ", ".join(str(n) for n, _ in damaged[:5]),
            "; ".join(
                part
                for part in (
                    f"round(s) {_rounds(rebuilt)} rebuilt from metrics.csv" if rebuilt else "",
                    f"round(s) {_rounds(dropped)} dropped (after the checkpoint: run again)"
                    if dropped
                    else "",
                )
                if part
            )
            or "nothing was lost",
            aside,
        )
        return aside

    def metrics(self) -> list[dict]:
        """The rows of metrics.jsonl. A line that is not one (cut short by a
        crash, or damaged: even bytes that are not UTF-8, which the writer
        never writes) is passed over here; a run's start repairs it
        (`repair_metrics_jsonl`)."""
        try:
            data = self.metrics_jsonl.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as e:
            raise RunDirError(f"cannot read {files.failure(e, self.metrics_jsonl)}") from None
        found = (_jsonl_row(line) for line in data.splitlines() if line.strip())
        return [row for row in found if row is not None]

    def privacy_ledger(self) -> list[dict]:
        """Every DP round this run directory has recorded, in order, re-runs
        included (see `record_spent`)."""
        text = self._read_text(self.privacy_jsonl, "delete it")
        entries = []
        for line in (text or "").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    def write_privacy_ledger(self, entries: list[dict]) -> None:
        """The ledger as `entries` (a resume rewrites it whole, which also
        drops a line a crash cut short, so appends start on a line of their own)."""
        with _writing("the privacy ledger", self.privacy_jsonl):
            files.write_atomic(self.privacy_jsonl, "".join(json.dumps(e) + "\n" for e in entries))

    def record_spent(self, entry: dict) -> None:
        """Appends a DP round to the ledger before its metrics are recorded.

        Unlike metrics.jsonl, the ledger is never cut back on resume: a round
        whose figures were recorded and that is run again after resuming from
        an earlier checkpoint used its clients' data twice, with fresh noise
        each time, and both count."""
        with _writing("the privacy ledger", self.privacy_jsonl), open(self.privacy_jsonl, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def truncate_metrics_after(self, round_num: int) -> None:
        """Drops JSONL rows of rounds after the checkpoint we resume from (the
        CSV drops its own when the next round is released)."""
        rows = [r for r in self.metrics() if r["round"] <= round_num]
        with _writing("metrics", self.metrics_jsonl):
            files.write_atomic(self.metrics_jsonl, "".join(json.dumps(r) + "\n" for r in rows))

    # --- artefacts -------------------------------------------------------------------

    def write_model(self, weights: Any) -> None:
        from coordinator.rounds.outputs import weight_arrays

        arrays = weight_arrays(weights)
        with (
            _writing("the final model", self.model_path),
            files.atomic_target(self.model_path, ".npz") as tmp,
        ):
            np.savez(tmp, **arrays)

    def write_plot(self, title: str = "") -> Path | None:
        from coordinator import plots

        rows = self.metrics()
        if not rows:
            return None
        with _writing("the plot", self.plot_path):
            plots.plot_metrics(rows, self.plot_path, title)
        return self.plot_path


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


def _append(path: Path, data: bytes) -> None:
    """Appends `data` whole or not at all: a write that fails (a full disk)
    is cut back to where it began, so no line is left half written."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def _jsonl_row(line: bytes) -> dict | None:
    """A metrics.jsonl line's row, or None if the line is not one."""
    try:
        row = json.loads(line)
    except ValueError:  # cut short, or not UTF-8
        return None
    if isinstance(row, dict) and type(row.get("round")) is int:
        return row
    return None


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return next(csv.reader(f), [])
    except FileNotFoundError:
        return []


def _csv_rows(path: Path, tolerant: bool = False) -> list[dict]:
    """metrics.csv's rows with a round (all of them, unless `tolerant`:
    then an unreadable file or row is passed over)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        return []
    except (OSError, ValueError, csv.Error):
        if tolerant:
            return []
        raise
    found = []
    for row in rows:
        value = row.get("round")
        if value is not None and value.isdigit():
            found.append(row)
        elif not tolerant:
            raise ValueError(f"a row without a round in {path}")
    return found


def _unflatten(flat: dict) -> dict:
    """A metrics row from its metrics.csv row (`_flatten` undone as far as a
    CSV row allows)."""
    row: dict[str, Any] = {"round": int(flat["round"])}
    for key, text in flat.items():
        if key == "round" or key is None or not text:
            continue
        try:
            value = float(text)
        except (TypeError, ValueError):
            continue
        *parents, leaf = key.split("/")
        node = row
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[leaf] = value
    row["rebuilt_from"] = "metrics.csv"
    return row


def _aside_name(path: Path) -> Path:
    """`path`, or `path.N` for the first N that is free."""
    aside, n = path, 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.{n}")
    return aside


def _rounds(rounds: list[int]) -> str:
    return ", ".join(map(str, rounds[:10])) + (", ..." if len(rounds) > 10 else "")
