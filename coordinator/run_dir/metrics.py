"""The metrics of each round: appended to metrics.csv, metrics.jsonl and
TensorBoard, and read back from metrics.jsonl."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.run_dir.events import TensorBoardEvents
from coordinator.run_dir.safe_io import append_whole, writing
from shared import files
from shared.errors import RunDirError


class MetricsLog(TensorBoardEvents):
    """The metrics part of a `RunDirectory`."""

    metrics_csv: Path
    metrics_jsonl: Path
    _csv_fields: list[str] | None
    """metrics.csv's header, once read or written."""

    def record_round(self, row: dict) -> None:
        """Appends one round's metrics to the CSV, the JSONL and TensorBoard.

        metrics.jsonl, written after the CSV, is what says a round is
        recorded (`progress_on_disk`); TensorBoard's events are buffered and
        reach the disk at `flush_tensorboard` (the writer calls it about once
        a second) or `close`."""
        round_num = int(row["round"])
        scalars: dict[str, float] = {}
        _flatten("", {k: v for k, v in row.items() if k != "round"}, scalars)
        with writing("metrics", self.metrics_csv):
            self._append_csv({"round": round_num, **scalars})
        with writing("metrics", self.metrics_jsonl):
            append_whole(self.metrics_jsonl, (json.dumps(row) + "\n").encode())
        with writing("TensorBoard events", self.tensorboard_dir):
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
        append_whole(self.metrics_csv, text.getvalue().encode())

    def _write_csv(self, fields: list[str], rows: list[dict]) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=fields, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        files.write_atomic(self.metrics_csv, text.getvalue())
        self._csv_fields = fields

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


def _flatten(prefix: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif isinstance(value, int | float | np.floating | np.integer):
        out[prefix] = float(value)


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
