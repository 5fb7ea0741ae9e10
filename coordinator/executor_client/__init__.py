"""Talking to TFF's C++ executor service: prepared computations, a deadline-bound
client per worker with byte counting, and the coordinator's own server executor.

    computations.py   computations compiled and serialized once; fast value serialization
    wire.py           the gRPC stub, counting bytes on the wire
    worker_client.py  `RemoteWorker`: every call with a deadline, errors naming the worker
    server.py         the coordinator's own executor, also TFF's default context here
    connection.py     channels (TLS) to workers
    probe.py          the direct probe that says why a channel does not connect
    certificates.py   what is wrong with a certificate, told from the certificates
"""

from coordinator.executor_client.computations import PreparedComputation
from coordinator.executor_client.wire import WireStats
from coordinator.executor_client.worker_client import (
    CallTiming,
    RemoteWorker,
    ValueRef,
    WorkerError,
)

__all__ = [
    "CallTiming",
    "PreparedComputation",
    "RemoteWorker",
    "ValueRef",
    "WireStats",
    "WorkerError",
]
