"""The run directory: where each of a run's files lives, its config, data
record and status; checkpoints and metrics come from the parts it is made of."""

from __future__ import annotations

import errno
import json
import logging
import os
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.run_dir import lock
from coordinator.run_dir.checkpoints import CheckpointStore
from coordinator.run_dir.metrics_repair import MetricsRepair
from coordinator.run_dir.record import RECORD_FIELDS, describe_record, record_differences
from coordinator.run_dir.safe_io import read_text, writing
from shared import files
from shared.errors import RunDirError

log = logging.getLogger("fedcompose.coordinator")


class RunDirectory(CheckpointStore, MetricsRepair):
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

    def saved_config(self) -> dict | None:
        text = read_text(self.config_path, "restore it")
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
        text = read_text(self.trained_on_path, "delete it to accept the workers as they are")
        if text is None:
            return None
        try:
            record = json.loads(text)
        except ValueError:
            record = None
        if not isinstance(record, dict) or any(
            not isinstance(record.get(key), kind) or isinstance(record.get(key), bool)
            for key, kind in RECORD_FIELDS.items()
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
        return lock.remove_temporaries(self.path)

    # --- writing: config, record, status ---------------------------------------------

    def write_config(self, toml_text: str) -> None:
        with writing("the run's config", self.config_path):
            files.write_atomic(self.config_path, toml_text)

    def write_trained_on(self, record: dict) -> None:
        with writing("the run's data record", self.trained_on_path):
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

    # --- artefacts -------------------------------------------------------------------

    def write_model(self, weights: Any) -> None:
        from coordinator.rounds.outputs import weight_arrays

        arrays = weight_arrays(weights)
        with (
            writing("the final model", self.model_path),
            files.atomic_target(self.model_path, ".npz") as tmp,
        ):
            np.savez(tmp, **arrays)

    def write_plot(self, title: str = "") -> Path | None:
        from coordinator import plots

        rows = self.metrics()
        if not rows:
            return None
        with writing("the plot", self.plot_path):
            plots.plot_metrics(rows, self.plot_path, title)
        return self.plot_path
