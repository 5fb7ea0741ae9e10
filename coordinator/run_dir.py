"""A run's directory: resolved config, metrics, TensorBoard, plot, checkpoints.

config.toml        the resolved configuration (feed it back with --config)
status.json        running / finished / failed, and the last completed round
metrics.csv        one row per round (TFF's CSVFileReleaseManager)
metrics.jsonl      the same, one JSON object per round, with per-worker times
tensorboard/       event files (TFF's TensorBoardReleaseManager)
checkpoints/       server state (TFF's FileProgramStateManager: atomic saves)
metrics.png        loss and accuracy against round
final_model.npz    the final global model weights
logs/              coordinator and worker logs
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from shared import files
from shared.errors import RunDirError

log = logging.getLogger("fedcompose.coordinator")

CHECKPOINT_PREFIX = "round_"


def _flatten(prefix: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif isinstance(value, int | float | np.floating | np.integer):
        out[prefix] = float(value)


class RunDirectory:
    def __init__(self, path: Path, keep_checkpoints: int = 3):
        self.path = path
        self.keep_checkpoints = keep_checkpoints
        self.config_path = path / "config.toml"
        self.status_path = path / "status.json"
        self.metrics_csv = path / "metrics.csv"
        self.metrics_jsonl = path / "metrics.jsonl"
        self.tensorboard_dir = path / "tensorboard"
        self.checkpoint_dir = path / "checkpoints"
        self.plot_path = path / "metrics.png"
        self.model_path = path / "final_model.npz"
        self.logs_dir = path / "logs"
        self._state_manager = None
        self._csv = None
        self._tensorboard = None

    # --- config and status -------------------------------------------------

    def saved_config(self) -> dict | None:
        if not self.config_path.exists():
            return None
        try:
            return tomllib.loads(self.config_path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise RunDirError(f"{self.config_path} is corrupt ({e}); use a new --run-dir") from None

    def write_config(self, toml_text: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        files.write_atomic(self.config_path, toml_text)

    def status(self) -> dict:
        try:
            return json.loads(self.status_path.read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def write_status(self, **fields: Any) -> None:
        status = self.status()
        status.update(fields, updated_at=time.time())
        files.write_atomic(self.status_path, json.dumps(status, indent=1))

    # --- checkpoints ---------------------------------------------------------

    def _states(self):
        if self._state_manager is None:
            import tensorflow_federated as tff

            self._state_manager = tff.program.FileProgramStateManager(
                str(self.checkpoint_dir),
                prefix=CHECKPOINT_PREFIX,
                keep_total=self.keep_checkpoints,
                keep_first=True,
            )
        return self._state_manager

    def latest_checkpoint(self) -> int | None:
        if not self.checkpoint_dir.exists():
            return None
        versions = asyncio.run(self._states().get_versions())
        return max(versions) if versions else None

    def save_checkpoint(self, round_num: int, state: Any) -> None:
        asyncio.run(self._states().save(state, round_num))

    def load_checkpoint(self, round_num: int, structure: Any) -> Any:
        try:
            return asyncio.run(self._states().load(round_num, structure))
        except Exception as e:  # TF raises many kinds for a mismatched structure
            raise RunDirError(
                f"checkpoint {self.checkpoint_dir / f'{CHECKPOINT_PREFIX}{round_num}'} does not "
                f"fit the configured model and algorithm ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200] if str(e) else ''}); use a new --run-dir"
            ) from None

    # --- metrics ---------------------------------------------------------------

    def _release_managers(self):
        if self._csv is None:
            import tensorflow_federated as tff

            self._csv = tff.program.CSVFileReleaseManager(
                str(self.metrics_csv), key_fieldname="round"
            )
            self._tensorboard = tff.program.TensorBoardReleaseManager(str(self.tensorboard_dir))
        return self._csv, self._tensorboard

    def record_round(self, row: dict) -> None:
        """Appends one round's metrics to the CSV, JSONL and TensorBoard logs."""
        round_num = int(row["round"])
        scalars: dict[str, float] = {}
        _flatten("", {k: v for k, v in row.items() if k != "round"}, scalars)
        csv, tensorboard = self._release_managers()

        async def release() -> None:
            await csv.release(scalars, key=round_num)
            await tensorboard.release(scalars, key=round_num)

        asyncio.run(release())
        with open(self.metrics_jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")

    def metrics(self) -> list[dict]:
        if not self.metrics_jsonl.exists():
            return []
        rows = []
        for line in self.metrics_jsonl.read_text().splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue  # a line cut short by a crash
        return rows

    def truncate_metrics_after(self, round_num: int) -> None:
        """Drops JSONL rows of rounds after the checkpoint we resume from."""
        rows = [r for r in self.metrics() if int(r["round"]) <= round_num]
        files.write_atomic(self.metrics_jsonl, "".join(json.dumps(r) + "\n" for r in rows))

    # --- artefacts -----------------------------------------------------------------

    def write_model(self, weights: Any) -> None:
        arrays = {f"trainable_{i}": np.asarray(w) for i, w in enumerate(weights.trainable)}
        arrays.update(
            {f"non_trainable_{i}": np.asarray(w) for i, w in enumerate(weights.non_trainable)}
        )
        with files.atomic_target(self.model_path, ".npz") as tmp:
            np.savez(tmp, **arrays)

    def write_plot(self, title: str = "") -> Path | None:
        from coordinator import plots

        rows = self.metrics()
        if not rows:
            return None
        plots.plot_metrics(rows, self.plot_path, title)
        return self.plot_path
