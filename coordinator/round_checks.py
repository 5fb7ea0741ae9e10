"""What the trainer checks after each round: non-finite values.

Non-finite values (NaN/inf), the whole class:

* a client's update or training loss (a NaN in its data, a diverging client
  learning rate): the client work zeroes it with weight zero and counts it;
  here the client is named (recomputed where it lives, `rounds.diagnosis`);
* the aggregate (DP noise, a quantizer, an overflowing sum): TFF's finalizer
  leaves the model unchanged and reports `update_non_finite`;
* the new model or server state (a diverging server optimizer): never
  recoverable, so always an error, and never checkpointed;
* a held-out figure (a NaN in a client's test file): the clients are named.

`--on-non-finite fail` (the default) stops the run with one line naming the
round, the client and its worker (exit code 6; the last checkpoint is the
round before, so `--on-non-finite drop` can resume it). `drop` leaves the
clients out (of the update, the train loss, and the held-out figures, which
are recomputed without them) and says so on the terminal and in the log.
"""

from __future__ import annotations

import logging
import math

from coordinator.federation import Federation
from coordinator.rounds import diagnosis
from coordinator.rounds.round_executor import RoundExecutor
from coordinator.rounds.timing import RoundResult
from shared.config import RunConfig
from shared.errors import TrainingError

log = logging.getLogger("fedcompose.coordinator")

_HINT_TRAIN = "a NaN/inf in its data or a diverging --client-learning-rate are the usual causes"


class RoundChecks:
    def __init__(self, config: RunConfig, executor: RoundExecutor, federation: Federation):
        self.policy = config.training.on_non_finite
        self.round_timeout = config.resilience.round_timeout
        self.executor = executor
        self.federation = federation
        self._diagnosis: diagnosis.ClientDiagnosis | None = None
        self.left_out_of_eval: frozenset[str] = frozenset()

    def _diagnose(self) -> diagnosis.ClientDiagnosis:
        if self._diagnosis is None:
            self._diagnosis = diagnosis.ClientDiagnosis(self.executor.algorithm, self.federation)
        return self._diagnosis

    def _fail_or_warn(self, message: str, dropped: str = "") -> None:
        """Raises with `message` (fail), or logs it with what was done (drop)."""
        if self.policy == "fail":
            raise TrainingError(
                f"{message}; --on-non-finite drop leaves such clients out and goes on"
            )
        log.warning("%s%s", message, f"; {dropped}" if dropped else "")

    def after_train(
        self,
        round_num: int,
        state_before: object,
        sampled: dict[int, list[str]],
        shuffle_seed: int,
        result: RoundResult,
    ) -> None:
        """Names non-finite clients and applies the policy; raises `TrainingError`."""
        m = result.metrics
        dropped = m.get("dropped_clients", 0)
        if dropped:
            weights = self.executor.model_weights(state_before)
            findings = self._diagnose().train(weights, sampled, shuffle_seed)
            if findings:
                who = diagnosis.describe(findings)
            else:
                who = "the clients could not be told apart on recomputing"
            self._fail_or_warn(
                f"round {round_num}: {dropped} client update(s) not finite: {who}; {_HINT_TRAIN}",
                "left out of this round's update and train figures",
            )
        if m.get("update_non_finite"):
            self._fail_or_warn(
                f"round {round_num}: the aggregated update was not finite, so the server "
                "left the model unchanged (check the aggregator's noise and norms and the "
                f"learning rates){self._user_clients(state_before, sampled, shuffle_seed)}"
            )
        if not diagnosis.finite_tree(result.state):
            raise TrainingError(
                f"round {round_num}: the server model or optimizer state became non-finite "
                "(NaN/inf); lower --server-learning-rate or choose another --server-optimizer; "
                "the last checkpoint is from the round before"
            )

    def _user_clients(
        self, state_before: object, sampled: dict[int, list[str]], shuffle_seed: int
    ) -> str:
        """For a user's process, whose client work reports no dropped clients:
        the clients whose training loss at the round's starting model is not
        finite, if the user gave a model to compute it with."""
        algorithm = self.executor.algorithm
        if not algorithm.user_defined or "train_outcome" not in algorithm.computations:
            return ""
        weights = self.executor.model_weights(state_before)
        findings = self._diagnose().train(weights, sampled, shuffle_seed)
        if not findings:
            return "; no client's training loss is non-finite at the round's starting model"
        return (
            f"; the training loss at the round's starting model is not finite for "
            f"{diagnosis.describe(findings)}; {_HINT_TRAIN}"
        )

    def _evaluate(self, state: object) -> dict | None:
        return self.executor.evaluate(state, self.round_timeout, leave_out=self.left_out_of_eval)

    def evaluate(self, round_num: int, state: object) -> dict | None:
        """Held-out figures of `state` (None if no worker could evaluate);
        non-finite ones name their clients and follow the policy (drop:
        recomputed without those clients)."""
        evaluation = self._evaluate(state)
        if evaluation is None:
            return None
        accuracy = evaluation.get("accuracy")
        if math.isfinite(evaluation["loss"]) and (accuracy is None or math.isfinite(accuracy)):
            if self.left_out_of_eval:
                evaluation["left_out_clients"] = len(self.left_out_of_eval)
            return evaluation
        findings = self._diagnose().evaluation(self.executor.model_weights(state))
        if len(findings) == self.federation.num_clients:
            raise TrainingError(
                f"round {round_num}: the model's held-out loss is not finite on every client: "
                "the model has diverged (its weights are finite but extreme); lower the "
                "learning rates"
            )
        who = diagnosis.describe(findings) if findings else "no single client is to blame"
        self._fail_or_warn(
            f"round {round_num}: the held-out loss is not finite: {who}; "
            "a NaN/inf in a test file is the usual cause"
        )
        if not findings:
            return evaluation
        self.left_out_of_eval |= frozenset(f.client for f in findings)
        log.warning(
            "held-out figures from now on leave out %d client(s): %s",
            len(self.left_out_of_eval),
            ", ".join(sorted(self.left_out_of_eval)),
        )
        evaluation = self._evaluate(state)
        if evaluation is not None:
            evaluation["left_out_clients"] = len(self.left_out_of_eval)
        return evaluation
