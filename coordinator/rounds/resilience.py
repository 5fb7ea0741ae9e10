"""A training round that survives losing workers: sample the live ones, accept
a degraded result, retry a round that lost too much, and stop clearly.

Before each attempt, workers that came back are taken back and the round's
clients are drawn from the workers that are up (`Federation.sample`: a pure
function of the seed, the round and the set of live workers). An attempt that
loses workers still counts if the clients whose updates made it are at least
`--min-coverage` of `--clients-per-round`; the merged update is then the
example-weighted mean over those clients only. Otherwise the round is tried
again (at most `--round-retries` times, waiting up to `--retry-wait` seconds
for down workers to return), and then the run stops with one line saying what
happened and how to resume. While the workers up host too few clients for a
round at all, no attempt is made: the run waits the outage out
(`coordinator.rounds.outage`), up to `--outage-wait`.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from coordinator.executor_client.worker_client import ComputationFailed
from coordinator.federation import Federation
from coordinator.rounds import outage
from coordinator.rounds.round_executor import RoundExecutor, RoundIncomplete, required_clients
from coordinator.rounds.timing import RoundResult
from shared import interrupts
from shared.config import ResilienceConfig, TrainingConfig
from shared.errors import FederationError

log = logging.getLogger("fedcompose.coordinator")


@dataclasses.dataclass(frozen=True)
class RoundPlan:
    """What every round of a run is asked: clients, seeds, and the failure rules."""

    clients_per_round: int
    seed: int
    rules: ResilienceConfig
    sampling: str = "uniform"

    @classmethod
    def of(cls, training: TrainingConfig, rules: ResilienceConfig) -> RoundPlan:
        return cls(training.clients_per_round, training.seed, rules, training.sampling)


def run_round(
    executor: RoundExecutor,
    federation: Federation,
    plan: RoundPlan,
    round_num: int,
    state: object,
    shuffle_seed: int,
    report: outage.Report | None = None,
) -> RoundResult:
    """Runs round `round_num` to a result, retrying it on the live workers.

    An attempt is made only when the workers up host enough clients for it;
    until then the run waits the outage out (`outage.wait_out`, at most
    `--outage-wait`), which spends none of the `--round-retries`."""
    rules = plan.rules
    needed = required_clients(plan.clients_per_round, rules.min_coverage)
    failures: list[str] = []
    started = time.monotonic()
    waited = 0.0
    while True:
        interrupts.raise_if_requested()
        if len(failures) > rules.round_retries:
            raise FederationError(
                _gave_up(federation, round_num, failures, time.monotonic() - started)
            )
        executor.admit_rejoining(plan.clients_per_round)
        if failures and outage.clients_on(federation, federation.live()) >= needed:
            _wait_for_workers(federation, rules.retry_wait)
            interrupts.raise_if_requested()
            executor.admit_rejoining(plan.clients_per_round)
        if outage.clients_on(federation, federation.live()) < needed:
            waited += outage.wait_out(
                executor,
                federation,
                round_num=round_num,
                needed=needed,
                limit=rules.outage_wait,
                clients_per_round=plan.clients_per_round,
                report=report,
            )
        live = federation.live()
        sampled = federation.sample(
            round_num, plan.clients_per_round, plan.seed, live, plan.sampling
        )
        try:
            result = executor.train_round(
                state,
                sampled,
                shuffle_seed,
                round_num=round_num,
                required=needed,
                round_timeout=rules.round_timeout,
            )
        except ComputationFailed as e:
            again = (
                f"train again with the same run directory to resume after round {round_num - 1}"
                if round_num > 1
                else "train again"
            )
            e.args = (
                f"round {round_num}: {e}; mend the model, the preprocessing or the data, "
                f"then {again}",
            )
            raise
        except RoundIncomplete as e:
            failures.append(str(e))
            log.warning("round %d, attempt %d fell short: %s", round_num, len(failures), e)
            continue
        result.live = live
        lost = set(result.lost_clients)
        result.delivered = {
            w: [c for c in ids if c not in lost] for w, ids in sampled.items() if ids
        }
        result.workers_total = len(federation.workers)
        result.attempts = len(failures) + 1
        result.failed_attempts = failures
        result.waited = waited
        return result


def _wait_for_workers(federation: Federation, seconds: float) -> None:
    """Waits up to `seconds` for a down worker to come back (and no longer)."""
    liveness = federation.liveness
    deadline = time.monotonic() + seconds
    while liveness is not None and (left := deadline - time.monotonic()) > 0:
        if liveness.take_rejoining():
            return
        liveness.wait_for_change(min(left, 0.5))
        interrupts.raise_if_requested()
    if liveness is None:
        time.sleep(seconds)


def _gave_up(federation: Federation, round_num: int, failures: list[str], seconds: float) -> str:
    down = []
    if federation.liveness is not None:
        down = [
            f"{w['address']} ({w['state']}: {w['reason'][:160]})"
            for w in federation.liveness.snapshot()
            if w["state"] != "up"
        ]
    what = f"{len(down)} of {len(federation.workers)} workers are down" if down else failures[-1]
    detail = "; ".join(down) if down else ""
    return (
        f"round {round_num} could not be completed in {len(failures)} attempts over "
        f"{seconds:.0f}s: {what}{f' ({detail})' if detail else ''}; last attempt: "
        f"{failures[-1][:300]}; restart the workers that are down and run the same command with "
        f"the same --run-dir to resume after round {round_num - 1}"
    )
