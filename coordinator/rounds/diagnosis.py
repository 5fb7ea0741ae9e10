"""Which clients were not finite: each suspect client's work, recomputed where it lives.

A round's aggregate only says how many clients sent a non-finite update
(`dropped_clients`); the client work cannot name them, since it sees a
client's dataset, not its id. So when a round had such clients, or a held-out
figure came out non-finite, each worker recomputes, for each of its clients
of that round, the client's update (or held-out loss) from the same model and
shuffle seed, and reports per client whether it was finite. This costs about
one more round, and only when something went wrong.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, cast

from coordinator.executor_client import PreparedComputation, WorkerError
from coordinator.federation import Federation
from coordinator.rounds.prepared import PreparedAlgorithm
from shared import preprocessing

log = logging.getLogger("fedcompose.coordinator")


@dataclasses.dataclass(frozen=True)
class ClientFinding:
    """One client whose update or held-out loss was not finite."""

    client: str
    worker: str
    """The worker's address."""
    loss: float
    examples: int

    def describe(self) -> str:
        return (
            f"client {self.client} on worker {self.worker} "
            f"(loss {self.loss}, {self.examples} examples)"
        )


class ClientDiagnosis:
    def __init__(self, algorithm: PreparedAlgorithm, federation: Federation):
        self.federation = federation
        self._train = algorithm.computations["train_outcome"]
        self._eval = algorithm.computations["eval_outcome"]

    def _run(
        self,
        comp: PreparedComputation,
        weights: object,
        ids_by_worker: dict[int, list[str]],
        seed: int,
    ) -> list[ClientFinding]:
        findings = []
        live = set(self.federation.live())
        for index, ids in sorted(ids_by_worker.items()):
            if not ids or index not in live:
                continue
            worker = self.federation.workers[index]
            had_executor = len(ids) in worker.client_counts()
            tokens = [preprocessing.make_token(c, seed) for c in ids]
            try:
                # `{<finite, loss, examples>}@CLIENTS` comes back as one mapping per client.
                outcomes = cast(
                    list[Mapping[str, Any]], worker.call(comp, (weights, tokens), len(ids))
                )
            except WorkerError as e:
                # Naming the clients is a courtesy; a worker lost meanwhile is
                # the round loop's business, not a reason to stop here.
                log.warning("could not recompute the clients of %s: %s", worker.label, e)
                continue
            finally:
                if not had_executor:
                    worker.dispose_executor(len(ids))
            for client, outcome in zip(ids, outcomes, strict=True):
                if not bool(outcome["finite"]):
                    findings.append(
                        ClientFinding(
                            client,
                            worker.address,
                            float(outcome["loss"]),
                            int(outcome["examples"]),
                        )
                    )
        return findings

    def train(
        self, weights: object, sampled: dict[int, list[str]], shuffle_seed: int
    ) -> list[ClientFinding]:
        """The round's clients whose update or training loss was not finite,
        given the model weights the round started from."""
        return self._run(self._train, weights, sampled, shuffle_seed)

    def evaluation(self, weights: object) -> list[ClientFinding]:
        """Clients whose held-out loss under `weights` is not finite."""
        ids = {i: self.federation.clients_of(i) for i in self.federation.live()}
        return self._run(self._eval, weights, ids, 0)


def describe(findings: list[ClientFinding], limit: int = 5) -> str:
    shown = "; ".join(f.describe() for f in findings[:limit])
    more = len(findings) - limit
    return shown + (f"; and {more} more" if more > 0 else "")


def finite_tree(value: object) -> bool:
    """Whether every number in a nested structure of arrays and scalars is finite."""
    import numpy as np
    import tensorflow as tf

    for leaf in tf.nest.flatten(value):
        array = np.asarray(leaf)
        if array.dtype.kind in "fc" and not np.all(np.isfinite(array)):
            return False
    return True
