"""fedcompose from Python: federations as context managers, training a learning
process across them, results a notebook can use.

    with fedcompose.LocalFederation(workers=3) as federation:
        result = federation.train(process, preprocess=preprocess, model_fn=model_fn,
                                  rounds=20, clients_per_round=10)
    result.history        # one row per round (pandas)
    result.model_weights  # the final model

The lifecycle is the one the commands use: a `FederationSession` connects to
the workers (and `LocalFederation` first starts them, as `fedcompose run`
does), `trainer.train` drives the rounds and writes the run directory
(metrics, checkpoints and resume, degraded rounds, the memory budget,
non-finite checks), and leaving the `with` block, however it is left, stops
what was started. Several trainings may run in one federation, one after
another, without restarting its workers (a sweep over algorithms or seeds).

Settings are the commands' own (`shared/config.py`), passed by name as
keyword arguments (`rounds=20`, `eval_every=5`, `run_dir="runs/a"`), or from a
config file (`config="sweep.toml"`), and checked by the same rules.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared import config as config_lib
from shared.errors import UsageError

if TYPE_CHECKING:
    import pandas as pd

    from coordinator.session import FederationSession

log = logging.getLogger("fedcompose.api")

TRAIN_SECTIONS = (
    "federation",
    "resilience",
    "model",
    "training",
    "algorithm",
    "evaluation",
    "output",
)
"""What `train(...)` takes by name: the `train` command's settings, but those
of the federation itself (its addresses, TLS kit, timeouts), which belong to
the federation object."""


FEDERATION_OWNED = frozenset(
    {"addresses", "tls_dir", "rpc_timeout", "connect_timeout", "workers", "base_port"}
)
"""Settings of the federation object, never of one training."""


def _declared(
    command: str, sections: tuple[str, ...], exclude: frozenset[str] = frozenset()
) -> dict[str, str]:
    """Setting name -> section, for the settings `command` takes in `sections`."""
    return {
        f.name: section
        for section, f in config_lib.COMMANDS[command].fields(config_lib.SECTIONS)
        if section in sections and f.name not in exclude
    }


def resolve_settings(
    command: str,
    sections: tuple[str, ...],
    values: Mapping[str, Any],
    config_file: str | Path | None = None,
    fixed: Mapping[str, Any] | None = None,
    what: str = "",
    exclude: frozenset[str] = frozenset(),
    elsewhere: str = "the federation (LocalFederation() or RemoteFederation())",
) -> config_lib.RunConfig:
    """A command's settings from keyword arguments (and a config file), checked
    by the declarations and rules the command line uses. `fixed` are set by
    the caller (a federation's addresses), not by the user."""
    declared = _declared(command, sections, exclude)
    unknown = sorted(set(values) - set(declared))
    if unknown:
        everything = {f.name for _, f in config_lib.COMMANDS["run"].fields(config_lib.SECTIONS)} | {
            f.name for _, f in config_lib.COMMANDS["train"].fields(config_lib.SECTIONS)
        }
        hints = []
        for name in unknown:
            if name in everything:
                hints.append(f"{name} is a setting of {elsewhere}, not of {what}")
        raise TypeError(
            f"{what} got unexpected setting(s) {', '.join(unknown)}"
            + (f" ({'; '.join(hints)})" if hints else "")
            + f"; it takes: {', '.join(sorted(declared))}"
        )
    namespace: dict[str, Any] = {"config": Path(config_file) if config_file else None}
    for name, value in {**values, **(fixed or {})}.items():
        section = declared.get(name) or _declared(command, tuple(config_lib.SECTIONS))[name]
        if isinstance(value, Path):
            value = str(value)
        elif hasattr(value, "dtype") and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            value = value.item()  # a numpy number (a sweep over np.linspace) as Python's
        namespace[f"{section}.{name}"] = value
    return config_lib.resolve(argparse.Namespace(**namespace), command)


@dataclasses.dataclass
class TrainingResult:
    """What a training left: its run directory, read back for a notebook."""

    run_dir: Path
    rounds_completed: int
    final_eval: dict | None
    """Held-out loss, accuracy and examples of the final model (None: no evaluation)."""
    model_weights: Any
    """The final model's weights (TFF's ModelWeights of numpy arrays)."""
    resumed_from: int | None = None
    already_finished: bool = False
    privacy: dict | None = None

    @property
    def records(self) -> list[dict]:
        """Every round as the run directory recorded it (metrics.jsonl)."""
        from coordinator.run_dir import RunDirectory

        return RunDirectory(self.run_dir).metrics()

    @property
    def history(self) -> pd.DataFrame:
        """One row per round: train and held-out figures, time and health."""
        return history_table(self.records)

    def plot(self, title: str = "") -> Any:
        """Loss and accuracy against round (a matplotlib Figure)."""
        from coordinator import plots

        figure = plots.metrics_figure(self.records, title or str(self.run_dir))
        if _in_notebook():
            # A figure made without pyplot has no inline display until the
            # inline backend is loaded: tell IPython to show figures as PNG.
            from IPython import get_ipython
            from IPython.core.pylabtools import select_figure_formats

            select_figure_formats(get_ipython(), {"png"})
        return figure

    def __repr__(self) -> str:
        held_out = ""
        if self.final_eval:
            accuracy = self.final_eval.get("accuracy")
            held_out = f", held-out loss {self.final_eval['loss']:.4f}" + (
                f" accuracy {accuracy:.4f}" if accuracy is not None else ""
            )
        done = ", finished before: nothing was run" if self.already_finished else ""
        return (
            f"TrainingResult({self.rounds_completed} rounds{held_out}{done}, "
            f"run_dir={self.run_dir})"
        )


HISTORY_COLUMNS = {
    "round": ("round",),
    "clients": ("clients",),
    "examples": ("examples",),
    "train_loss": ("train", "loss"),
    "train_accuracy": ("train", "accuracy"),
    "eval_loss": ("eval", "loss"),
    "eval_accuracy": ("eval", "accuracy"),
    "round_seconds": ("round_seconds",),
    "degraded": ("degraded",),
    "clients_lost": ("clients_lost",),
}


def history_table(rows: list[dict]) -> pd.DataFrame:
    """Per-round figures as a table; a user's process adds its measurements
    (flattened, `measurements/...`)."""
    import pandas as pd

    table = []
    for row in rows:
        line: dict[str, Any] = {}
        for column, path in HISTORY_COLUMNS.items():
            value: Any = row
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            line[column] = value
        for name, value in (row.get("measurements") or {}).items():
            line[f"measurements/{name}"] = value
        table.append(line)
    frame = pd.DataFrame(table, columns=None if table else list(HISTORY_COLUMNS))
    return frame.set_index("round") if "round" in frame else frame


class Federation:
    """Workers serving their shards, connected; trains learning processes on them.

    Use as a context manager, or `start()` and `close()`. `close()` runs on
    leaving the `with` block (on an exception and KeyboardInterrupt too) and at
    interpreter exit; workers a `LocalFederation` started also stop when their
    parent process dies (a notebook kernel restarted or killed).
    """

    command = "train"

    def __init__(self, *, verbose: bool = False, progress: bool = True):
        self.verbose = verbose
        self.progress = progress
        self._session: FederationSession | None = None
        self._closer = weakref.finalize(self, lambda: None)

    # --- lifecycle --------------------------------------------------------------------

    def _addresses(self) -> list[str]:
        raise NotImplementedError

    def _open(self) -> FederationSession:
        raise NotImplementedError

    def _stop(self) -> None:
        """Stops what this federation started (the session is closed already)."""

    def start(self) -> Federation:
        if self._session is not None:
            # A second `with` would close it on leaving, under the first one's feet.
            raise UsageError(
                "the federation is running already: use it in one `with` block, or call "
                "start() once and close() once"
            )
        from shared.quiet import quiet_tensorflow

        quiet_tensorflow(self.verbose)
        try:
            with _console_logging(self.verbose):
                self._session = self._open()
                self._session.__enter__()
        except BaseException:
            self.close()
            raise
        # Runs at interpreter exit if close() has not (a finalizer holding the
        # bound `_stop` keeps the object alive until then).
        self._closer.detach()
        self._closer = weakref.finalize(self, _close_quietly, self._session, self._stop)
        return self

    def close(self) -> None:
        """Stops every process this federation started; safe to call again."""
        session, self._session = self._session, None
        self._closer.detach()
        _close_quietly(session, self._stop)

    def __enter__(self) -> Federation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def session(self) -> FederationSession:
        if self._session is None:
            raise UsageError(
                "the federation is not running: use it in a `with` block, or call start()"
            )
        return self._session

    @property
    def num_clients(self) -> int:
        federation = self.session.federation
        assert federation is not None
        return federation.num_clients

    @property
    def workers(self) -> list[str]:
        return list(self.session.addresses)

    @property
    def data_format(self) -> Any:
        """The workers' `shard_format.DataFormat` (element spec, encoding, label)."""
        federation = self.session.federation
        assert federation is not None
        return federation.data

    def raw_element_spec(self) -> Any:
        """One raw example as the workers serve it to `preprocess` (tf.TensorSpecs
        in the structure their manifests record, equal on every worker)."""
        from shared import preprocessing

        return preprocessing.raw_element_spec(self.data_format)

    def empty_client_dataset(self) -> Any:
        """A dataset of no examples with `raw_element_spec()`: to trace a preprocess on."""
        from coordinator.algorithm.user_process import empty_raw_dataset

        return empty_raw_dataset(self.data_format)

    def _fixed_settings(self) -> dict[str, Any]:
        """Settings the federation gives every training (its addresses, TLS...)."""
        return {"addresses": self._addresses()}

    # --- training ---------------------------------------------------------------------

    def train(
        self,
        process: Any = None,
        *,
        preprocess: Callable | None = None,
        model_fn: Callable | None = None,
        eval_preprocess: Callable | None = None,
        name: str = "",
        config: str | Path | None = None,
        **training_settings: Any,
    ) -> TrainingResult:
        """Trains `process` (a `tff.learning.templates.LearningProcess` whose
        `next` takes client datasets) across the workers, or fedcompose's own
        algorithm from its settings if `process` is None.

        `preprocess` turns a client's raw examples (`federation.raw_element_spec()`:
        what the workers' manifests record; TFF's federated EMNIST element for the
        default data and EMNIST) into the batches the process takes; it
        runs on the workers. `model_fn` (TFF's model function) is what held-out
        evaluation and non-finite diagnosis use; without it, rounds are trained
        and recorded but not evaluated. Every other keyword is a setting of
        `fedcompose train` by name (`rounds`, `clients_per_round`, `seed`,
        `run_dir`, `eval_every`, `checkpoint_every`, `on_non_finite`,
        `round_timeout`, ...); `config` a TOML file of them. Re-running with
        the same `run_dir` resumes after its last checkpoint.
        """
        from coordinator import run_dir as run_dir_lib
        from coordinator import trainer
        from coordinator.cli import resolve_run_dir

        session = self.session
        user = None
        if process is not None:
            from coordinator.algorithm.user_process import UserAlgorithm

            if preprocess is None:
                raise UsageError(
                    "train(process, ...) needs preprocess=: a function from a client's raw "
                    "examples (federation.raw_element_spec()) to the batches the process takes"
                )
            assert session.federation is not None
            user = UserAlgorithm(
                process, preprocess, model_fn, eval_preprocess, name, session.federation.data
            )
        elif preprocess is not None or model_fn is not None:
            raise UsageError(
                "preprocess= and model_fn= go with a process; without one, fedcompose's own "
                "algorithm is trained from its settings (model=, aggregator=, ...)"
            )
        cfg = resolve_settings(
            "train",
            TRAIN_SECTIONS,
            training_settings,
            config,
            fixed=self._fixed_settings(),
            what="train()",
            exclude=FEDERATION_OWNED,
        )
        run_dir = resolve_run_dir(cfg)
        with (
            run_dir_lib.locked(run_dir, "train") as removed,
            _run_logging(run_dir, self.verbose),
        ):
            if removed:
                log.info("removed %d temporary file(s) a killed run left", len(removed))
            run_dir_lib.plan_resume(run_dir_lib.RunDirectory(run_dir), cfg, "train")
            summary = trainer.train(
                cfg,
                self._addresses(),
                run_dir,
                show_progress=self.progress,
                command="train",
                session=session,
                algorithm=user,
                progress=_notebook_progress(),
            )
        weights = summary.model_weights
        if weights is None:
            weights = _saved_weights(run_dir)
        return TrainingResult(
            run_dir=run_dir,
            rounds_completed=summary.rounds_completed,
            final_eval=summary.final_eval,
            model_weights=weights,
            resumed_from=summary.resumed_from,
            already_finished=summary.already_finished,
            privacy=summary.privacy,
        )


class RemoteFederation(Federation):
    """Workers already running (`fedcompose worker`), at `addresses`; with a
    coordinator kit (`tls_dir`) the connections are mutual TLS."""

    def __init__(
        self,
        addresses: list[str],
        *,
        tls_dir: str | Path | None = None,
        rpc_timeout: float | None = None,
        connect_timeout: float | None = None,
        verbose: bool = False,
        progress: bool = True,
    ):
        super().__init__(verbose=verbose, progress=progress)
        if isinstance(addresses, str):  # "h1:p1,h2:p2", as --addresses takes it
            addresses = [a.strip() for a in addresses.split(",") if a.strip()]
        if not isinstance(addresses, list | tuple) or not all(
            isinstance(a, str) for a in addresses
        ):
            raise TypeError(
                "RemoteFederation(addresses): a list of 'host:port' strings (or one string "
                f"'h1:p1,h2:p2'), got {addresses!r}"
            )
        given: dict[str, object] = {
            "addresses": list(addresses),
            "tls_dir": str(tls_dir) if tls_dir else "",
        }
        if rpc_timeout is not None:
            given["rpc_timeout"] = rpc_timeout
        if connect_timeout is not None:
            given["connect_timeout"] = connect_timeout
        self.config = resolve_settings(
            "train", ("federation", "tls"), given, what="RemoteFederation()"
        )
        self.config.federation.worker_memory_mb = 0  # a training's setting

    def _addresses(self) -> list[str]:
        return list(self.config.federation.addresses)

    def _fixed_settings(self) -> dict[str, Any]:
        f = self.config.federation
        return {
            "addresses": list(f.addresses),
            "tls_dir": self.config.tls.tls_dir,
            "rpc_timeout": f.rpc_timeout,
            "connect_timeout": f.connect_timeout,
        }

    def _open(self) -> FederationSession:
        from coordinator.executor_client.connection import load_client_tls
        from coordinator.session import FederationSession
        from shared import loopback

        tls = load_client_tls(self.config.tls.tls_dir)
        # The coordinator's own executor service listens on loopback only.
        loopback.confine_children()
        f = self.config.federation
        return FederationSession(
            f.addresses,
            rpc_timeout=f.rpc_timeout,
            connect_timeout=f.connect_timeout,
            tls=tls,
        )


def _close_quietly(session: FederationSession | None, stop: Callable[[], None]) -> None:
    try:
        if session is not None:
            session.close()
    finally:
        stop()


def _saved_weights(run_dir: Path) -> Any:
    """The final model a finished run directory holds (final_model.npz)."""
    import numpy as np
    import tensorflow_federated as tff

    from coordinator.rounds.outputs import weights_from_arrays
    from coordinator.run_dir import RunDirectory

    try:
        with np.load(RunDirectory(run_dir).model_path) as saved:
            trainable, rest = weights_from_arrays({n: saved[n] for n in saved.files})
    except (OSError, ValueError, KeyError):
        return None
    return tff.learning.models.ModelWeights(trainable, rest)


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ipython = getattr(shell, "get_ipython", lambda: None)()
    return ipython is not None and type(ipython).__name__ == "ZMQInteractiveShell"


def _notebook_progress() -> Callable[..., Any]:
    """tqdm's widget in a notebook, its text bar elsewhere."""
    if _in_notebook():
        from tqdm.auto import tqdm

        return tqdm
    from tqdm import tqdm as text_tqdm

    return text_tqdm


@contextlib.contextmanager
def _console_logging(verbose: bool) -> Iterator[None]:
    """fedcompose's own lines on stderr (warnings, or everything with
    `verbose`), without touching the handlers the host program set."""
    logger = logging.getLogger("fedcompose")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s fedcompose %(levelname)s %(message)s", "%H:%M:%S")
    )
    handler.setLevel(logging.DEBUG if verbose else logging.WARNING)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    # The host's handlers (a notebook's, basicConfig's) would print each line again.
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


@contextlib.contextmanager
def _run_logging(run_dir: Path, verbose: bool) -> Iterator[None]:
    """The run's log file (logs/coordinator.log) and the console, for one training."""
    from shared.errors import RunDirError
    from shared.logs import resilient_file_handler

    logger = logging.getLogger("fedcompose")
    try:
        file_handler = resilient_file_handler(run_dir / "logs" / "coordinator.log")
    except UsageError as e:  # the log file cannot be opened: a run directory problem
        raise RunDirError(str(e)) from None
    file_handler.setFormatter(
        logging.Formatter("%(asctime)s train %(levelname)s %(name)s %(message)s")
    )
    logger.addHandler(file_handler)
    try:
        with _console_logging(verbose):
            yield
    finally:
        logger.removeHandler(file_handler)
        file_handler.close()
