"""The coordinator's own executor: where server-side computations run.

Merging partial aggregates and the finalizer (server optimizer) run on a
private `worker_binary` that the coordinator starts on loopback (confined
there and owning its port, see `shared.loopback`) and that dies with it.
The same executor backs TFF's default context in this process, so
that a call such as `process.initialize()` never makes TFF start its own,
unsupervised executor (which was seen outliving its parent).
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import tensorflow_federated as tff
from tensorflow_federated.python.common_libs import structure
from tensorflow_federated.python.core.impl.context_stack import context_base
from tensorflow_federated.python.core.impl.executors import cardinalities_utils

from coordinator.executor_client.computations import PreparedComputation
from coordinator.executor_client.worker_client import RemoteWorker, WorkerError
from shared import executor_binary, loopback, ports, processes, scratch


@dataclasses.dataclass
class ServerExecutor:
    worker: RemoteWorker
    process: subprocess.Popen
    workdir: Path

    @classmethod
    def start(cls, rpc_timeout: float = 600.0, log_path: Path | None = None) -> ServerExecutor:
        workdir = scratch.make("server")
        port = ports.free_port()
        log_path = log_path or workdir / "executor.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(log_path, "ab") as log_file:
                process = executor_binary.start(port, workdir, log_file)
        except BaseException:
            scratch.release(workdir)
            raise
        worker = RemoteWorker(
            executor_binary.loopback_address(port),
            rpc_timeout=rpc_timeout,
            label="coordinator's server executor",
        )
        server = cls(worker, process, workdir)
        try:
            worker.wait_ready(timeout=60.0)
            loopback.check_confined(process.pid, "the coordinator's server executor")
        except (WorkerError, loopback.ConfinementError):
            server.stop()
            raise
        return server

    def stop(self) -> None:
        self.worker.close()
        processes.stop(self.process, grace=3.0)
        scratch.release(self.workdir)

    def install_as_default_context(self) -> None:
        tff.framework.set_default_context(ServerContext(self.worker))


class ServerContext(context_base.SyncContext):
    """TFF's default context, backed by the server executor."""

    def __init__(self, worker: RemoteWorker):
        self._worker = worker
        self._prepared: dict[int, tuple[object, PreparedComputation]] = {}

    def invoke(self, comp: tff.Computation, arg: object) -> object:
        entry = self._prepared.get(id(comp))
        if entry is None or entry[0] is not comp:
            entry = (comp, PreparedComputation(comp, getattr(comp, "name", "comp")))
            self._prepared[id(comp)] = entry
        prepared = entry[1]
        num_clients = 0
        if arg is not None:
            if isinstance(arg, structure.Struct):
                arg = structure.to_odict_or_tuple(arg, recursive=False)
            cardinalities = cardinalities_utils.infer_cardinalities(arg, prepared.parameter_type)
            num_clients = cardinalities.get(tff.CLIENTS, 0)
        return self._worker.call(prepared, arg, num_clients)
