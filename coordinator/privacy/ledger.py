"""The run directory's privacy ledger (`privacy.jsonl`): every DP round a run
ran, in order, re-runs after a resume included."""

from __future__ import annotations

import json
from pathlib import Path

from coordinator.run_dir.safe_io import read_text, writing
from shared import files


class PrivacyLedger:
    def __init__(self, path: Path):
        self.path = path

    def entries(self) -> list[dict]:
        """Every DP round recorded, in order, re-runs included (see `append`)."""
        text = read_text(self.path, "delete it")
        entries = []
        for line in (text or "").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    def write(self, entries: list[dict]) -> None:
        """The ledger as `entries` (a resume rewrites it whole, which also drops
        a line a crash cut short, so appends start on a line of their own)."""
        with writing("the privacy ledger", self.path):
            files.write_atomic(self.path, "".join(json.dumps(e) + "\n" for e in entries))

    def append(self, entry: dict) -> None:
        """Appends a DP round before its metrics are recorded.

        Unlike metrics.jsonl, the ledger is never cut back on resume: a round
        whose figures were recorded and that is run again after resuming from
        an earlier checkpoint used its clients' data twice, with fresh noise
        each time, and both count."""
        with writing("the privacy ledger", self.path), open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
