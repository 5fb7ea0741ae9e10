"""An error TensorFlow raises inside a computation on a worker is the
computation's, not a lost worker: the run stops at once saying what raised
it, instead of retrying the round and advising to restart workers that are
up (which it used to do, after four attempts)."""

from __future__ import annotations

import json

import grpc
import pytest
import tensorflow as tf

from coordinator.executor_client import worker_client
from tests.user_algorithms import tutorial


class _Error(grpc.RpcError, grpc.Call):
    def __init__(self, code: grpc.StatusCode, details: str):
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    # grpc.Call's other abstract methods: never called here.
    def initial_metadata(self):  # pragma: no cover
        return None

    def trailing_metadata(self):  # pragma: no cover
        return None

    def time_remaining(self):  # pragma: no cover
        return None

    def cancel(self):  # pragma: no cover
        return False

    def is_active(self):  # pragma: no cover
        return False

    def add_callback(self, callback):  # pragma: no cover
        return False


TF_ERROR = (
    "Failed to run computation: assertion failed: [user check failed] [x] [0] "
    "[[{{function_node assert_less_Assert}}{{node Assert}}]] [[StatefulPartitionedCall]] "
    "while evaluating local [_vqe74] in block locals [_vqe37]"
)
USER_MESSAGE = "assertion failed: [user check failed] [x] [0]"


@pytest.mark.parametrize(
    "code, details, expected",
    [
        (grpc.StatusCode.INTERNAL, TF_ERROR, USER_MESSAGE),
        (grpc.StatusCode.INVALID_ARGUMENT, TF_ERROR, USER_MESSAGE),
        # The worker, not its computation: lost, retried, probed.
        (grpc.StatusCode.UNAVAILABLE, TF_ERROR, None),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", None),
        (grpc.StatusCode.INTERNAL, "Failed to run computation: Cancelled: call ended", None),
        (grpc.StatusCode.INTERNAL, "executor 7 not found", None),
    ],
)
def test_what_counts_as_the_computations_own_error(code, details, expected):
    assert worker_client._failed_computation(_Error(code, details)) == expected


def _failing_preprocess(dataset):
    def check(x, y):
        # True of no EMNIST batch: tutorial pixels are 1 - ink, never above 1.
        tf.debugging.assert_greater(tf.reduce_min(x), 1.0, message="user check failed")
        return x, y

    return tutorial.preprocess(dataset).map(check)


@pytest.mark.slow
def test_a_computation_that_raises_stops_the_run_at_once_and_keeps_the_workers(tmp_path):
    import fedcompose

    spec = tutorial.preprocess(fedcompose.empty_client_dataset()).element_spec
    model_fn = tutorial.model_fn_for(spec)
    process = tutorial.compose(model_fn)
    with fedcompose.LocalFederation(workers=2, progress=False) as federation:
        pids = {w.process.pid for w in federation._workers.started}
        with pytest.raises(worker_client.ComputationFailed) as raised:
            federation.train(
                process, preprocess=_failing_preprocess, rounds=2, clients_per_round=6,
                run_dir=tmp_path / "bad",
            )  # fmt: skip
        message = str(raised.value)
        assert message.startswith("round 1: the computation failed on worker 127.0.0.1:")
        assert "user check failed" in message and "mend the model" in message
        assert "down" not in message and "attempts" not in message and "[[{{" not in message
        status = json.loads((tmp_path / "bad" / "status.json").read_text())
        assert status["state"] == "failed" and status["error"] == message
        # Nobody was lost: the same workers train the mended process.
        result = federation.train(
            process, preprocess=tutorial.preprocess, rounds=1, clients_per_round=6,
            run_dir=tmp_path / "good",
        )  # fmt: skip
        assert len(result.history) == 1
        assert {w.process.pid for w in federation._workers.started} == pids
