"""Metrics files brought back in line with the checkpoint a run resumes from:
lines a crash cut short repaired, rows after the checkpoint dropped."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from coordinator.run_dir.checkpoints import UNREADABLE_PREFIX
from coordinator.run_dir.metrics import MetricsLog, _csv_rows, _flatten, _jsonl_row
from coordinator.run_dir.safe_io import aside_name, writing
from shared import files
from shared.errors import RunDirError, one_line

log = logging.getLogger("fedcompose.coordinator")


class MetricsRepair(MetricsLog):
    """The metrics-repair part of a `RunDirectory`."""

    path: Path

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
                with writing("metrics", self.metrics_csv):
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
        aside = aside_name(self.path / f"{UNREADABLE_PREFIX}{self.metrics_csv.name}")
        rows = self.metrics()
        with writing("metrics", self.metrics_csv):
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
        aside = aside_name(self.path / f"{UNREADABLE_PREFIX}{self.metrics_jsonl.name}")
        rows.sort(key=lambda r: r["round"])
        with writing("metrics", self.metrics_jsonl):
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
                    f"round(s) {rounds_text(rebuilt)} rebuilt from metrics.csv" if rebuilt else "",
                    f"round(s) {rounds_text(dropped)} dropped (after the checkpoint: run again)"
                    if dropped
                    else "",
                )
                if part
            )
            or "nothing was lost",
            aside,
        )
        return aside

    def truncate_metrics_after(self, round_num: int) -> None:
        """Drops JSONL rows of rounds after the checkpoint we resume from (the
        CSV drops its own when the next round is released)."""
        rows = [r for r in self.metrics() if r["round"] <= round_num]
        with writing("metrics", self.metrics_jsonl):
            files.write_atomic(self.metrics_jsonl, "".join(json.dumps(r) + "\n" for r in rows))


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


def rounds_text(rounds: list[int]) -> str:
    return ", ".join(map(str, rounds[:10])) + (", ..." if len(rounds) > 10 else "")
