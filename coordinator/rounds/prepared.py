"""The composed algorithm as the computations the workers run, compiled once
per algorithm and code version and kept in a cache across processes.

Composing the four blocks and compiling them for the C++ runtime takes 5 to
10 s of one core (TensorFlow traces the model and the client update a dozen
times, AutoGraph rewrites them), at every start of `train`, `run` or a
resume. What the workers need from it is a handful of serialized
computations and their types, a few MB that depend only on the algorithm's
settings and on the code that builds them. So they are kept in a cache,
keyed by a digest of the settings, the TensorFlow, TFF and Python versions,
and every source file of `coordinator/` and `shared/`: any change to the code
or the settings builds afresh. An entry that cannot be read is built again
(and replaced) with a warning; a cache that cannot be written costs the
build, never the run.

The cache is `$FEDCOMPOSE_CACHE_DIR`, else `$XDG_CACHE_HOME/fedcompose/computations`
(`~/.cache/...`); `FEDCOMPOSE_CACHE_DIR=off` turns it off. It keeps the
`KEEP` newest entries, and is not used if other users can write to it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import platform
import zipfile
from pathlib import Path

from coordinator import algorithm as algorithm_lib
from coordinator.algorithm import aggregator, fused_share
from coordinator.executor_client import PreparedComputation
from coordinator.rounds.mergeable import PARTS, compile_form, prepare_parts
from shared import files

log = logging.getLogger("fedcompose.coordinator")

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("coordinator", "shared")
"""Where the code that builds the computations lives."""
KEEP = 32
FORMAT = 1
ENV = "FEDCOMPOSE_CACHE_DIR"

MERGEABLE = ("train", "eval")
SINGLE = (
    "initialize",
    "eval.initialize",
    "get_model_weights",
    "eval.set_model_weights",
    "train_outcome",
    "eval_outcome",
)
NAMES = (*(f"{m}.{p}" for m in MERGEABLE for p in PARTS), *SINGLE)
FUSED = "train.fused"
"""A training share as one TensorFlow call per worker (absent when not fusable)."""
FUSED_NOTE = "fused_note"


@dataclasses.dataclass
class PreparedAlgorithm:
    """What a `RoundExecutor` runs: every computation of one algorithm, prepared.

    Built from fedcompose's own blocks (`spec`), or from a learning process a
    user composed in Python (`spec` None: `coordinator.algorithm.user_process`),
    whose metrics are read by name where they exist and whose evaluation
    exists only if the user gave a model to evaluate."""

    spec: algorithm_lib.AlgorithmSpec | None
    computations: dict[str, PreparedComputation]
    cached: bool = False
    """Whether the computations came from the cache."""
    description: str = ""
    """One line naming the algorithm (the spec's blocks, or the user's process)."""
    model_mb: float | None = None
    """A user model's weights in MB (what its memory plan is sized by)."""
    fused_note: str = ""
    """Why training has no fused share (`FUSED`), if it has none."""

    @property
    def empty_clients_harmless(self) -> bool:
        # A user's aggregator is unknown: never padded, whatever it counts.
        return self.spec is not None and aggregator.empty_clients_harmless(self.spec)

    @property
    def user_defined(self) -> bool:
        return self.spec is None

    @property
    def evaluates(self) -> bool:
        return "eval.up_to_merge" in self.computations

    def describe(self) -> str:
        return self.spec.describe() if self.spec is not None else self.description

    def parts(self, mergeable: str) -> dict[str, PreparedComputation]:
        return {p: self.computations[f"{mergeable}.{p}"] for p in PARTS}


class NotMergeable(Exception):
    """TFF's mergeable-form compiler cannot split the algorithm's round; the
    cause is what the compiler raised."""


def build(spec: algorithm_lib.AlgorithmSpec) -> PreparedAlgorithm:
    """Composes and compiles the algorithm (`NotMergeable` if it cannot be
    split across workers)."""
    alg = algorithm_lib.build(spec)
    comps: dict[str, PreparedComputation] = {}
    note = ""
    for mergeable, process in (("train", alg.process), ("eval", alg.evaluation)):
        try:
            form = compile_form(process.next, mergeable)
        except Exception as e:  # the compiler raises several kinds
            raise NotMergeable(mergeable) from e
        for part, prepared in prepare_parts(form, mergeable).items():
            comps[f"{mergeable}.{part}"] = prepared
        if mergeable == "train":
            try:
                fused = algorithm_lib.fused_train_share(spec, form.up_to_merge)
                comps[FUSED] = PreparedComputation(fused, FUSED)
            except fused_share.NotFusable as e:
                note = str(e)
    singles = {
        "initialize": alg.process.initialize,
        "eval.initialize": alg.evaluation.initialize,
        "get_model_weights": alg.process.get_model_weights,
        "eval.set_model_weights": alg.evaluation.set_model_weights,
        "train_outcome": alg.train_outcome,
        "eval_outcome": alg.eval_outcome,
    }
    for name, comp in singles.items():
        comps[name] = PreparedComputation(comp, name)
    return PreparedAlgorithm(spec, comps, description=spec.describe(), fused_note=note)


def cache_dir() -> Path | None:
    configured = os.environ.get(ENV)
    if configured == "off":
        return None
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedcompose" / "computations"


def _source_digest() -> str:
    digest = hashlib.sha256()
    for top in SOURCES:
        for path in sorted((ROOT / top).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def cache_key(spec: algorithm_lib.AlgorithmSpec, sources: str | None = None) -> str:
    import tensorflow as tf
    import tensorflow_federated as tff

    what = {
        "format": FORMAT,
        "spec": dataclasses.asdict(spec),
        "versions": [tf.__version__, tff.__version__, platform.python_version()],
        "sources": sources if sources is not None else _source_digest(),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def _load(path: Path, spec: algorithm_lib.AlgorithmSpec) -> PreparedAlgorithm | None:
    try:
        with zipfile.ZipFile(path) as archive:
            entries = {name: archive.read(name) for name in archive.namelist()}
        comps = {}
        for name in NAMES:
            parts = {
                key: entries[f"{name}/{key}"]
                for key in ("value", "parameter", "result")
                if f"{name}/{key}" in entries
            }
            comps[name] = PreparedComputation.from_bytes(name, parts)
        if f"{FUSED}/value" in entries:
            parts = {k: entries[f"{FUSED}/{k}"] for k in ("value", "parameter", "result")}
            comps[FUSED] = PreparedComputation.from_bytes(FUSED, parts)
        note = entries.get(FUSED_NOTE, b"").decode()
    except FileNotFoundError:
        return None
    except Exception as e:  # a damaged entry of any kind is rebuilt
        log.warning("compile cache entry %s cannot be read (%s); building it again", path, e)
        return None
    return PreparedAlgorithm(spec, comps, cached=True, description=spec.describe(), fused_note=note)


def _save(path: Path, prepared: PreparedAlgorithm) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, comp in prepared.computations.items():
            parts = comp.to_bytes()
            try:
                whole = PreparedComputation.from_bytes(name, parts).to_bytes() == parts
            except (AttributeError, ValueError, ImportError):
                whole = False
            if not whole:  # a type whose container cannot be named
                log.info("compile cache: %s does not serialize whole; not cached", name)
                return
            for key, data in parts.items():
                archive.writestr(f"{name}/{key}", data)
        archive.writestr(FUSED_NOTE, prepared.fused_note.encode())
    try:
        files.write_atomic(path, buffer.getvalue())
        _prune(path.parent)
    except OSError as e:
        log.info("compile cache not written (%s): %s", path, e)


def _prune(directory: Path) -> None:
    entries = sorted(directory.glob("*.zip"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[KEEP:]:
        old.unlink(missing_ok=True)
    files.remove_stale_temporaries(directory)


def _trusted(directory: Path) -> bool:
    """Whether the cache directory is this user's alone (made so if missing): an
    entry is code that the coordinator and the workers run."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.stat()
    except OSError as e:
        log.info("compile cache %s cannot be used (%s); building", directory, e)
        return False
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        log.warning(
            "compile cache %s is not used: other users can write to it; make it yours "
            "with mode 0700, or set %s to another directory",
            directory,
            ENV,
        )
        return False
    return True


def prepare(spec: algorithm_lib.AlgorithmSpec) -> PreparedAlgorithm:
    """The algorithm's computations, from the cache or built (and cached)."""
    directory = cache_dir()
    if directory is None or not _trusted(directory):
        return build(spec)
    path = directory / f"{cache_key(spec)}.zip"
    prepared = _load(path, spec)
    if prepared is not None:
        try:
            os.utime(path)  # newest first when pruning
        except OSError:
            pass
        return prepared
    prepared = build(spec)
    _save(path, prepared)
    return prepared
