"""The training loop: rounds, evaluation, metrics, checkpoints, resume."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tensorflow_federated as tff
from tqdm import tqdm

from coordinator import algorithm_record
from coordinator import federation as federation_lib
from coordinator import run_dir as run_dir_lib
from coordinator.algorithm import AlgorithmSpec
from coordinator.executor_client.connection import load_client_tls
from coordinator.liveness import WORKERS_VIEW
from coordinator.privacy import accountant as privacy
from coordinator.privacy.spending import PrivacySpending, recorded
from coordinator.record_writer import RecordWriter
from coordinator.round_checks import RoundChecks
from coordinator.rounds import resilience
from coordinator.rounds.outputs import weight_lists
from coordinator.rounds.round_executor import RoundExecutor
from coordinator.rounds.timing import RoundResult
from coordinator.run_dir import RunDirectory
from coordinator.session import FederationSession
from shared import interrupts, pause_points
from shared.config import RunConfig
from shared.errors import RunDirError, UsageError, one_line

if TYPE_CHECKING:
    from coordinator.algorithm.user_process import UserAlgorithm
    from coordinator.rounds.round_executor import RoundExecutor

log = logging.getLogger("fedcompose.coordinator")


@dataclasses.dataclass
class TrainSummary:
    run_dir: Path
    rounds_completed: int
    final_eval: dict | None
    resumed_from: int | None
    already_finished: bool = False
    privacy: dict | None = None
    """(epsilon, delta) spent, with a DP aggregator."""
    model_weights: object | None = None
    """The final model's weights (TFF's ModelWeights of numpy arrays); None for a
    run that was finished already (its run directory's model.npz holds them)."""


def _eval_figures(evaluation: dict, digits: int = 4) -> str:
    return f"loss {evaluation['loss']:.{digits}f} acc {_figure(evaluation.get('accuracy'), digits)}"


def _figure(value: float | None, digits: int = 4) -> str:
    """A train figure; None when no client of the round had a finite update."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def _round_line(row: dict) -> str:
    parts = [
        f"round {row['round']:>4}",
        f"clients {row['clients']:>4}",
        f"examples {row['examples'] if row['examples'] is not None else 'n/a':>6}",
        f"loss {_figure(row['train']['loss'])}",
        f"acc {_figure(row['train']['accuracy'])}",
        f"{row['round_seconds']:.2f}s",
    ]
    if row.get("dropped_clients"):
        parts.insert(3, f"non-finite dropped {row['dropped_clients']}")
    if "privacy" in row:
        parts.append(f"| {privacy.describe(row['privacy'])}")
    if "eval" in row:
        parts.append(f"| held-out {_eval_figures(row['eval'])}")
        missing = _missing_from(row["eval"])
        if missing:
            parts.append(f"on {row['eval']['examples']} examples, without {missing}")
    if row.get("degraded"):
        parts.append(
            f"| degraded: {row['clients_lost']} of {row['clients_sampled']} clients "
            f"lost with {', '.join(row['workers_lost'])}, attempt {row['attempts']}"
        )
    elif row.get("retried"):
        parts.append(f"| retried: attempt {row['attempts']}, the earlier ones fell short")
    if row.get("waited_for_workers"):
        parts.append(f"| waited {row['waited_for_workers']:.0f}s for workers to return")
    if row.get("live_workers") and len(row["live_workers"]) < row.get("workers_total", 0):
        parts.append(f"| {len(row['live_workers'])} of {row['workers_total']} workers up")
    return "  ".join(parts)


def _missing_from(evaluation: dict) -> str:
    """The workers whose writers an evaluation does not cover ("" if none)."""
    down = evaluation.get("workers_down", [])
    lost = [w for w in evaluation.get("workers_lost", {}) if w not in down]
    return ", ".join([*(f"{w} (down)" for w in down), *(f"{w} (lost)" for w in lost)])


def _row(round_num: int, result: RoundResult, evaluation: dict | None) -> dict:
    row = {"round": round_num, "finished_at": round(time.time(), 3), **result.record()}
    if evaluation is not None:
        row["eval"] = evaluation
    return row


def _final_eval(status: dict) -> dict | None:
    """The final held-out figures status.json recorded, if it holds them whole
    (an edited or damaged file made the summary line a traceback)."""
    final = status.get("final_eval")

    def number(value: object) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    # A user's model may have no accuracy metric.
    if (
        isinstance(final, dict)
        and all(number(final.get(k)) for k in ("loss", "examples"))
        and (final.get("accuracy") is None or number(final.get("accuracy")))
    ):
        return final
    return None


def _already_finished(
    run: RunDirectory,
    plan: run_dir_lib.ResumePlan,
    algorithm: UserAlgorithm | None,
    quiet: bool,
) -> TrainSummary:
    """What a run that has nothing left to do returns, once the algorithm asked
    for is the one it was trained with."""
    if algorithm is not None or algorithm_record.recorded(run.path):
        # Not the process it was trained with: refused, not "finished".
        from coordinator.algorithm import user_process

        now = algorithm_record.record(user_process.prepare(algorithm)) if algorithm else None
        algorithm_record.check(run.path, now, resuming=True)
    # From Python, where the console shows warnings only, this must be seen.
    (log.info if quiet else log.warning)(
        "%s already finished %d rounds; nothing to do (raise --rounds to continue it, "
        "or use a new --run-dir)",
        run.path,
        plan.latest,
    )
    return TrainSummary(
        run.path,
        plan.latest or 0,
        _final_eval(plan.status),
        plan.latest,
        True,
        privacy=recorded(plan.status),
    )


def _round_executor(
    session: FederationSession,
    config: RunConfig,
    algorithm: UserAlgorithm | None,
    federation: federation_lib.Federation,
) -> RoundExecutor:
    """The round executor of fedcompose's own algorithm (from `config`), or of
    the user's learning process."""
    if algorithm is None:
        spec = AlgorithmSpec.from_config(config, federation.task.num_classes)
        log.info("algorithm: %s", spec.describe())
        return session.round_executor(spec, config.federation.worker_memory_mb)
    executor = session.user_round_executor(algorithm, config.federation.worker_memory_mb)
    log.info("algorithm: %s", executor.algorithm.describe())
    return executor


def train(
    config: RunConfig,
    addresses: list[str],
    run_dir: Path,
    show_progress: bool | None = None,
    command: str = "train",
    *,
    session: FederationSession | None = None,
    algorithm: UserAlgorithm | None = None,
    progress: Callable[..., Any] | None = None,
) -> TrainSummary:
    """Trains over the workers at `addresses` (or over an open `session`, which
    stays open), writing everything to `run_dir`.

    The algorithm is fedcompose's own, composed from `config`'s blocks, or a
    learning process the user composed in Python (`algorithm`). The caller
    holds the run directory's lock (`run_dir.locked`). Nothing in the
    directory changes until the resume is known to be sound: settings
    (`plan_resume`), data (`check_trained_on`), algorithm and checkpoint all
    fit. A run that fails or is interrupted after that leaves `status.json`
    saying so, with the progress its files hold. `progress` makes the
    progress bar (tqdm's signature; default: tqdm on a terminal).
    """
    t = config.training
    run = RunDirectory(run_dir, keep_checkpoints=config.output.keep_checkpoints)
    plan = run_dir_lib.plan_resume(run, config, command)
    if plan.finished:
        return _already_finished(run, plan, algorithm, quiet=session is None)
    pause_points.reached("startup")
    started = False
    opened: contextlib.AbstractContextManager[FederationSession]
    if session is not None:
        opened = contextlib.nullcontext(session)
    else:
        opened = FederationSession(
            addresses,
            rpc_timeout=config.federation.rpc_timeout,
            connect_timeout=config.federation.connect_timeout,
            log_dir=run.logs_dir,
            tls=load_client_tls(config.tls.tls_dir),
        )
    try:
        with opened as session:
            federation = session.federation
            assert federation is not None
            if t.clients_per_round > federation.num_clients:
                raise UsageError(
                    f"--clients-per-round {t.clients_per_round} is more than the "
                    f"{federation.num_clients} clients the workers host"
                )
            record = run_dir_lib.data_record([d.manifest for d in federation.descriptions])
            if plan.resuming:
                run.check_trained_on(record)
            # How rounds drew from these clients; a stratified draw's strata are the
            # shards, whose clients `clients_per_shard` records.
            record["sampling"] = t.sampling
            executor = _round_executor(session, config, algorithm, federation)
            user_record = algorithm_record.record(executor.algorithm)
            algorithm_record.check(run.path, user_record, resuming=plan.resuming)
            log.info("%s", executor.memory.describe())
            state = executor.initialize()
            restored = run.restore(state) if plan.resuming else None
            # Everything fits: from here on the directory records this run.
            started = True
            run.write_config(run_dir_lib.config_to_record(run.saved_config(), config, command))
            run.write_trained_on(record)
            algorithm_record.write(run.path, user_record)
            federation.watch(
                config.resilience.probe_interval,
                config.resilience.probe_interval_max,
                view_path=run.path / WORKERS_VIEW,
            )
            start_round = 1
            if restored is not None:
                start_round = restored[0] + 1
                state = restored[1]
                log.info("resuming %s after round %d", run_dir, restored[0])
            run.prepare_metrics(start_round - 1)
            run.write_status(
                state="running",
                completed_rounds=start_round - 1,
                checkpoint_round=start_round - 1,
                target_rounds=t.rounds,
            )
            checks = RoundChecks(config, executor, federation)
            spending = PrivacySpending(config, federation)
            spending.restore(run, start_round - 1)
            try:
                final_eval, weights = _loop(
                    config,
                    run,
                    executor,
                    federation,
                    state,
                    start_round,
                    checks,
                    spending,
                    _progress_bar(progress, show_progress, t.rounds, start_round),
                )
            finally:
                # A session that serves more trainings (a sweep) keeps nothing of this one.
                session.release(executor)
        return TrainSummary(
            run_dir,
            max(t.rounds, start_round - 1),
            final_eval,
            start_round - 1 or None,
            privacy=spending.privacy(),
            model_weights=tff.learning.models.ModelWeights(*weight_lists(weights)),
        )
    except KeyboardInterrupt:
        if started:
            run.note_stopped("interrupted")
        raise
    except BaseException as exc:
        if interrupts.requested():  # the interrupt surfaced as another error
            if started:
                run.note_stopped("interrupted")
            raise KeyboardInterrupt(str(exc)) from exc
        if started:
            # The whole line the user sees, not only its first line.
            run.note_stopped("failed", error=one_line(exc, limit=None))
        raise


def _progress_bar(
    progress: Callable[..., Any] | None, show: bool | None, rounds: int, start_round: int
) -> Any:
    make = progress or tqdm
    return make(
        total=rounds,
        initial=start_round - 1,
        unit="round",
        dynamic_ncols=True,
        disable=(not sys.stderr.isatty()) if show is None else not show,
        file=sys.stderr,
    )


def _loop(
    config: RunConfig,
    run: RunDirectory,
    executor: RoundExecutor,
    federation: federation_lib.Federation,
    state: object,
    start_round: int,
    checks: RoundChecks,
    spending: PrivacySpending,
    bar: Any,
) -> tuple[dict | None, object]:
    t, e = config.training, config.evaluation
    plan = resilience.RoundPlan.of(t, config.resilience)
    # A crash after the last checkpoint but before the end leaves no rounds to run.
    evaluation = checks.evaluate(t.rounds, state) if start_round > t.rounds else None
    # Each round's records are written by a thread of their own while the next
    # round runs (record_writer); a failed write stops the run at the next round.
    writer = RecordWriter(run, checkpoint_round=start_round - 1)
    try:
        for round_num in range(start_round, t.rounds + 1):
            interrupts.raise_if_requested()
            writer.raise_if_failed()
            pause_points.reached("round", round_num)
            shuffle_seed = federation_lib.shuffle_seed(t.seed, round_num)
            result = resilience.run_round(
                executor,
                federation,
                plan,
                round_num,
                state,
                shuffle_seed,
                report=lambda waiting: run.write_status(waiting=waiting),
            )
            checks.after_train(round_num, state, result.delivered, shuffle_seed, result)
            state = result.state
            last = round_num == t.rounds
            evaluation = None
            if last or (e.eval_every and round_num % e.eval_every == 0):
                pause_points.reached("evaluation", round_num)
                evaluation = checks.evaluate(round_num, state)
            row = _row(round_num, result, evaluation)
            spent = spending.spend(round_num, result)
            if spent is not None:
                row["privacy"] = spent
            checkpoint = last or (
                config.output.checkpoint_every and round_num % config.output.checkpoint_every == 0
            )
            writer.round_done(row, run_dir_lib.state_leaves(state) if checkpoint else None)
            tqdm.write(_round_line(row), file=sys.stderr)
            postfix = {
                "loss": _figure(row["train"]["loss"], 3),
                "acc": _figure(row["train"]["accuracy"], 3),
            }
            if evaluation and evaluation.get("accuracy") is not None:
                postfix["held-out acc"] = f"{evaluation['accuracy']:.3f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
        writer.close()
    except BaseException:
        writer.abandon()
        raise
    finally:
        bar.close()
    pause_points.reached("finish")
    weights = executor.model_weights(state)
    run.write_model(weights)
    plot = run.write_plot(f"{_model_name(config, executor)}, {len(federation.workers)} workers")
    spent = spending.privacy()
    run.write_status(
        state="finished", final_eval=evaluation, **({"privacy": spent} if spent else {})
    )
    if evaluation is not None:
        left_out = evaluation.get("left_out_clients")
        missing = _missing_from(evaluation)
        held_out = sum(d.manifest.test_examples for d in federation.descriptions)
        log.info(
            "final model on %s held-out examples%s%s: %s",
            f"{evaluation['examples']} of the {held_out}"
            if left_out or missing
            else f"all {evaluation['examples']}",
            f" ({left_out} client(s) left out: not finite)" if left_out else "",
            f", without the writers of {missing}" if missing else "",
            _eval_figures(evaluation).replace("acc ", "accuracy "),
        )
    if spent is not None:
        log.info("privacy spent after %d rounds: %s", t.rounds, privacy.describe(spent))
    log.info(
        "run directory: %s (metrics.csv, metrics.png%s, tensorboard/, checkpoints/)",
        run.path,
        "" if plot else " missing",
    )
    return evaluation, weights


def _model_name(config: RunConfig, executor: RoundExecutor) -> str:
    if executor.algorithm.user_defined:
        return executor.algorithm.describe()
    return f"{config.model.model} model"


__all__ = ["RunDirError", "TrainSummary", "train"]
