"""`fedcompose data`: build worker shards from a federated dataset.

Goes through `deploy.data.build.build_shards`, the same path `fedcompose run`
takes, so shards made here are exactly what a run would make. Bad options are
refused before any data is read (exit 2); a source that cannot be read ends
the command with one line (exit 3).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from deploy.data import build, progress
from shared import config, files, logs, shard_format
from shared.errors import FedcomposeError, UsageError
from shared.quiet import quiet_tensorflow

log = logging.getLogger("fedcompose.data")

PROG = "fedcompose data"
OWN_ENTRIES = re.compile(r"^(shard-\d{3,}|data-spec\.json|\.staging)$")
"""What a previous `fedcompose data` leaves in its output directory."""


DESCRIPTION = (
    "Build one shard directory per worker (shard-000, shard-001, ... in --shards-dir) "
    "from a federated dataset: the offline default (scikit-learn digits as synthetic "
    "writers), TFF's federated EMNIST, any TFF SQLite client-data file (--from-sqlite) "
    "or a table with a client-id column (--from-table). Whole clients go to shards, "
    "balanced by example "
    "count. `fedcompose run --shards-dir` and `fedcompose worker --shard` serve them."
)


def run(settings: config.RunConfig) -> int:
    quiet_tensorflow(verbose=settings.output.verbose)
    logs.setup(verbose=settings.output.verbose, name="data")
    data = settings.data
    out = Path(data.shards_dir).expanduser()
    problem = _unusable_out_dir(out, data.force)
    if problem:
        raise UsageError(problem)
    timer = PhaseTimer()
    if data.from_sqlite or data.from_table:
        return _build_own(data, out, settings.federation.workers, timer)
    _check_writers(data, settings.federation.workers)
    try:
        paths = build.build_shards(
            data, out, settings.federation.workers, reuse=False, progress=timer.progress
        )
    except OSError as e:
        if not str(e.filename or "").startswith(str(out)):
            raise
        raise FedcomposeError(f"cannot write the shards: {files.failure(e)}") from None
    manifests = [shard_format.read_manifest(p) for p in paths]
    labels = [shard_labels(p, m) for p, m in zip(paths, manifests, strict=True)]
    _print_to_stdout(summary(out, manifests, labels, timer))
    return 0


def _build_own(data: config.DataConfig, out: Path, workers: int, timer: PhaseTimer) -> int:
    """Shards of any structure from a TFF SQLite file or a table (`client_data`)."""
    from deploy.data import client_data

    if data.from_sqlite:
        from deploy.data import tff_sqlite

        splits = tuple(s.strip() for s in data.sqlite_splits.split(",") if s.strip()) or None
        name, train, test = tff_sqlite.load(data.from_sqlite, splits)
    else:
        from deploy.data import tables

        train, test = tables.load(data.from_table, data.client_id_column)
        name = Path(data.from_table).stem
    try:
        paths = client_data.build_shards(
            train,
            out,
            workers=workers,
            test=test,
            partition=data.partition,
            label_key=data.label_key or None,
            alpha=data.alpha,
            seed=data.data_seed,
            dataset=name,
        )
    except OSError as e:
        if not str(e.filename or "").startswith(str(out)):
            raise
        raise FedcomposeError(f"cannot write the shards: {files.failure(e)}") from None
    manifests = [shard_format.read_manifest(p) for p in paths]
    _print_to_stdout(own_summary(out, manifests, timer))
    return 0


def own_summary(out: Path, manifests: list[shard_format.Manifest], timer: PhaseTimer) -> str:
    first = manifests[0]
    info = first.partition
    lines = [
        f"{len(manifests)} shards in {out} (build {first.build_id})",
        f"source: {info.get('source_description')}",
        f"examples: {first.data.describe()}"
        + (f", label {first.data.label_key!r}" if first.data.label_key else ""),
        f"partition: {info['scheme']}"
        + (f", alpha {info['alpha']}" if info.get("alpha") is not None else "")
        + f", seed {info['seed']}",
    ]
    if info.get("writers_left_out"):
        lines.append(
            f"left out: {info['writers_left_out']} test-only client(s) "
            f"({info.get('examples_left_out', 0)} test examples)"
        )
    lines += ["", f"{'shard':<10}{'clients':>9}{'train':>10}{'test':>9}"]
    for m in manifests:
        lines.append(
            f"shard-{m.shard_index:03d} {len(m.clients):>9}{m.train_examples:>10}"
            f"{m.test_examples:>9}"
        )
    lines += ["", f"time: {timer.report()}"]
    return "\n".join(lines)


def _print_to_stdout(text: str) -> None:
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # The reader left (say `| head`); the shards are written, which is what
        # counts. Point stdout at /dev/null so the exit flush does not fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# --- validation, before any data is read ---------------------------------------------


def _unusable_out_dir(out: Path, force: bool) -> str | None:
    if not out.exists():
        return None
    if not out.is_dir():
        return f"--shards-dir {out} exists and is not a directory"
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return None
    if not force:
        return f"--shards-dir {out} is not empty; pass --force to replace the shards in it"
    foreign = [name for name in entries if not OWN_ENTRIES.match(name)]
    if foreign:
        return (
            f"--shards-dir {out} holds files `fedcompose data` did not make (e.g. "
            f"{foreign[0]!r}); not replacing them even with --force, choose another directory"
        )
    return None


def _check_writers(data: config.DataConfig, num_shards: int) -> None:
    """Compares the shard count with the writer count, from metadata only."""
    if data.source != "emnist":
        return  # checked with the settings
    from deploy.data import emnist

    survey = emnist.survey(data.emnist_path, data.only_digits)
    log.info(
        "%s: EMNIST %s, %d writers, %d train / %d test examples "
        "(%d writer(s) without training examples left out)",
        survey.path,
        survey.variant.label,
        survey.writers,
        survey.train_examples,
        survey.test_examples,
        survey.writers_left_out,
    )
    if num_shards > survey.writers:
        raise UsageError(
            f"--workers {num_shards} is more than the {survey.writers} writers of the data; "
            "every shard needs at least one; use fewer --workers"
        )


# --- progress and timing ---------------------------------------------------------------


@dataclasses.dataclass
class PhaseTimer:
    """Progress bars for the long phases, and how long each took.

    Bars only on a terminal: in a log file tqdm's redraws are noise, and the
    summary's timings say the same once the command ends.
    """

    started: float = dataclasses.field(default_factory=time.monotonic)
    phases: dict[str, float] = dataclasses.field(default_factory=dict)

    @contextlib.contextmanager
    def progress(self, description: str, total: int, unit: str) -> Iterator[Callable[[int], None]]:
        began = time.monotonic()
        with progress.bar(description, total, unit) as advance:
            yield advance
        self.phases[description] = self.phases.get(description, 0.0) + time.monotonic() - began

    def report(self) -> str:
        total = time.monotonic() - self.started
        parts = [f"{name} {seconds:.1f}s" for name, seconds in self.phases.items()]
        rest = total - sum(self.phases.values())
        parts.append(f"other (start-up, checks, partitioning) {rest:.1f}s")
        return f"{', '.join(parts)}; total {total:.1f}s"


# --- the summary -----------------------------------------------------------------------


def shard_labels(shard_dir: Path, manifest: shard_format.Manifest) -> np.ndarray:
    """Label counts of a shard (train and test), read back from its files."""
    counts = np.zeros(manifest.task.num_classes, dtype=np.int64)
    for client in manifest.clients:
        for split in shard_format.SPLITS:
            path = shard_dir / shard_format.client_path(split, client.id)
            if client.examples(split):
                records = np.memmap(path, dtype=shard_format.RECORD_DTYPE, mode="r")
                counts += np.bincount(records["label"], minlength=len(counts))[: len(counts)]
    return counts


def label_name(label: int, num_classes: int) -> str:
    """EMNIST's order: digits, then upper-case, then lower-case letters."""
    if label < 10 or num_classes != 62:
        return str(label)
    return chr(ord("A") + label - 10) if label < 36 else chr(ord("a") + label - 36)


def summary(
    out: Path,
    manifests: list[shard_format.Manifest],
    labels_per_shard: list[np.ndarray],
    timer: PhaseTimer,
) -> str:
    first = manifests[0]
    info = first.partition
    lines = [
        f"{len(manifests)} shards in {out} (build {first.build_id})",
        f"source: {info.get('source_description') or info.get('source')}",
        f"partition: {info['scheme']}"
        + (f", alpha {info['alpha']}" if info.get("alpha") is not None else "")
        + f", seed {info['seed']}",
    ]
    if info.get("writers_left_out"):
        lines.append(
            f"left out: {info['writers_left_out']} writer(s) without training examples "
            f"({info.get('examples_left_out', 0)} test examples)"
        )
    lines += ["", f"{'shard':<10}{'clients':>9}{'train':>10}{'test':>9}{'classes':>9}"]
    for manifest, labels in zip(manifests, labels_per_shard, strict=True):
        lines.append(
            f"shard-{manifest.shard_index:03d} {len(manifest.clients):>9}"
            f"{manifest.train_examples:>10}{manifest.test_examples:>9}"
            f"{int(np.count_nonzero(labels)):>9}"
        )
    totals = np.sum(labels_per_shard, axis=0)
    lines.append(
        f"{'total':<10}{sum(len(m.clients) for m in manifests):>9}"
        f"{sum(m.train_examples for m in manifests):>10}"
        f"{sum(m.test_examples for m in manifests):>9}{int(np.count_nonzero(totals)):>9}"
    )
    sizes = [m.train_examples + m.test_examples for m in manifests]
    lines.append(f"largest minus smallest shard: {max(sizes) - min(sizes)} examples")
    lines += ["", "labels (train + test, all shards):", *_histogram_rows(totals, first.task)]
    lines += ["", f"time: {timer.report()}"]
    return "\n".join(lines)


def _histogram_rows(counts: np.ndarray, task: shard_format.Task, per_row: int = 8) -> list[str]:
    width = max(len(f"{int(c):,}") for c in counts)
    cells = [
        f"{label_name(k, task.num_classes):>2} {int(c):>{width},}" for k, c in enumerate(counts)
    ]
    return ["  " + "   ".join(cells[i : i + per_row]) for i in range(0, len(cells), per_row)]
