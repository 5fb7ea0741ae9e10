"""`fedcompose data`: build worker shards from a federated dataset.

Goes through `deploy.datasets.build_shards`, the same path `fedcompose run`
takes, so shards made here are exactly what a run would make. Bad options are
refused before any data is read (exit 2); a source that cannot be read ends
the command with one line (exit 1).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from deploy import datasets, progress
from deploy.sources import DataSourceError
from shared import logs, shard_format
from shared.quiet import quiet_tensorflow

log = logging.getLogger("fedcompose.data")

PROG = "fedcompose data"
DEFAULT_WRITERS = 60
DEFAULT_ALPHA = 0.5
DEFAULT_EMNIST_PATH = "~/.tff"
"""Where `tff.simulation.datasets.emnist.load_data` caches the file by default."""
OWN_ENTRIES = re.compile(r"^(shard-\d{3,}|data-spec\.json|\.staging)$")
"""What a previous `fedcompose data` leaves in its output directory."""


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog=PROG)
    parser.description = (
        "Build one shard directory per worker from a federated dataset: the offline "
        "default (scikit-learn digits as synthetic writers) or TFF's federated EMNIST. "
        "Whole clients go to shards, balanced by example count."
    )
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument(
        "--source", choices=datasets.SOURCES, default="default", help="federated dataset to read"
    )
    parser.add_argument(
        "--emnist-path",
        default=DEFAULT_EMNIST_PATH,
        help="EMNIST only: emnist_all.sqlite or the directory holding it; TFF downloads it "
        "there if it is missing and the network allows (~/.tff is TFF's own cache)",
    )
    classes = parser.add_mutually_exclusive_group()
    classes.add_argument(
        "--only-digits",
        dest="only_digits",
        action="store_true",
        default=True,
        help="EMNIST: the digits only, 10 classes (default: %(default)s)",
    )
    classes.add_argument(
        "--all-classes",
        dest="only_digits",
        action="store_false",
        default=argparse.SUPPRESS,  # --only-digits holds the default
        help="EMNIST: digits and upper- and lower-case letters, 62 classes",
    )
    parser.add_argument(
        "--workers", type=int, default=3, metavar="W", help="number of shards, one per worker"
    )
    parser.add_argument(
        "--partition",
        choices=datasets.PARTITIONS,
        default="natural",
        help="natural: the real writers; iid / dirichlet: the same examples re-dealt to as "
        "many synthetic clients, uniformly or with Dirichlet(alpha) label mixes",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=DEFAULT_ALPHA,
        help="Dirichlet concentration for --partition dirichlet (lower: more label skew)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of every random choice (same seed, same shards)"
    )
    parser.add_argument(
        "--writers",
        type=int,
        default=DEFAULT_WRITERS,
        help="default source only: number of synthetic writers",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        default=argparse.SUPPRESS,
        help="directory to write shard-000, shard-001, ... in",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace the shards in a non-empty --out (it must hold only earlier shards)",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def run(args: argparse.Namespace) -> int:
    quiet_tensorflow(verbose=args.verbose)
    logs.setup(verbose=args.verbose, name="data")

    problem = _invalid_options(args) or _unusable_out_dir(args.out, args.force)
    if problem:
        return _fail(problem, code=2)
    spec = datasets.DataSpec(
        source=args.source,
        # Recorded in data-spec.json: spell the default as `fedcompose run` does.
        emnist_path="" if args.emnist_path == DEFAULT_EMNIST_PATH else args.emnist_path,
        only_digits=args.only_digits,
        partition=args.partition,
        alpha=args.alpha,
        seed=args.seed,
        writers=args.writers,
    )
    timer = PhaseTimer()
    try:
        problem = _shards_exceed_writers(spec, args.workers)
        if problem:
            return _fail(problem, code=2)
        paths = datasets.build_shards(
            spec, args.out, args.workers, reuse=False, progress=timer.progress
        )
        manifests = [shard_format.read_manifest(p) for p in paths]
        labels = [shard_labels(p, m) for p, m in zip(paths, manifests, strict=True)]
        report = summary(args.out, manifests, labels, timer)
    except (DataSourceError, shard_format.ShardError) as e:
        return _fail(str(e), code=1)
    except ValueError as e:  # build_shards: a spec the data cannot meet
        return _fail(str(e), code=2)
    except OSError as e:
        return _fail(f"{e.filename}: {e.strerror}" if e.filename else str(e), code=1)
    _print_to_stdout(report)
    return 0


def _print_to_stdout(text: str) -> None:
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # The reader left (say `| head`); the shards are written, which is what
        # counts. Point stdout at /dev/null so the exit flush does not fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


# --- validation, before any data is read ---------------------------------------------


def _invalid_options(args: argparse.Namespace) -> str | None:
    checks = [
        (args.workers >= 1, f"--workers must be >= 1, got {args.workers}"),
        (args.alpha > 0 and math.isfinite(args.alpha), f"--alpha must be > 0, got {args.alpha}"),
        (args.seed >= 0, f"--seed must be >= 0, got {args.seed}"),
        (args.writers >= 1, f"--writers must be >= 1, got {args.writers}"),
        (
            args.partition == "dirichlet" or args.alpha == DEFAULT_ALPHA,
            f"--alpha applies to --partition dirichlet only, not {args.partition}",
        ),
        (
            args.source == "default" or args.writers == DEFAULT_WRITERS,
            "--writers applies to --source default only; EMNIST has its real writers",
        ),
        (
            args.source == "emnist" or args.emnist_path == DEFAULT_EMNIST_PATH,
            "--emnist-path applies to --source emnist only",
        ),
        (
            args.source == "emnist" or args.only_digits,
            "--all-classes needs --source emnist; the default source has digits only",
        ),
    ]
    return next((message for ok, message in checks if not ok), None)


def _unusable_out_dir(out: Path, force: bool) -> str | None:
    if not out.exists():
        return None
    if not out.is_dir():
        return f"--out {out} exists and is not a directory"
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return None
    if not force:
        return f"--out {out} is not empty; pass --force to replace the shards in it"
    foreign = [name for name in entries if not OWN_ENTRIES.match(name)]
    if foreign:
        return (
            f"--out {out} holds files `fedcompose data` did not make (e.g. {foreign[0]!r}); "
            "not replacing them even with --force, choose another directory"
        )
    return None


def _shards_exceed_writers(spec: datasets.DataSpec, num_shards: int) -> str | None:
    """Compares the shard count with the writer count, from metadata only."""
    if spec.source == "default":
        writers = spec.writers
        hint = "use fewer --workers or more --writers"
    else:
        from deploy import emnist

        survey = emnist.survey(spec.emnist_path, spec.only_digits)
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
        writers = survey.writers
        hint = "use fewer --workers"
    if num_shards > writers:
        return (
            f"--workers {num_shards} is more than the {writers} writers of the data; every "
            f"shard needs at least one; {hint}"
        )
    return None


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
