"""A deadline-bound client for TFF's C++ executor service.

TFF's own `RemoteExecutor` makes blocking gRPC calls without deadlines and its
execution contexts retry UNAVAILABLE forever, so a dead worker hangs the
caller. This client speaks the same `ExecutorGroup` protocol with TFF's own
protos and value serialization, but gives every RPC a deadline, turns every
gRPC failure into a `WorkerError` naming the worker, counts bytes on the wire,
and keeps a computation loaded on the worker across rounds instead of
re-sending it with every call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
from collections.abc import Callable

import grpc
import tensorflow_federated as tff
from tensorflow_federated.proto.v0 import executor_pb2, executor_pb2_grpc
from tensorflow_federated.python.core.impl.executors import value_serialization
from tensorflow_federated.python.core.impl.types import type_conversions

_MAX_MESSAGE_BYTES = 2000 * 1000 * 1000
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    # Fail fast on a dead peer instead of waiting for TCP timeouts.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.enable_retries", 0),
]


class WorkerError(RuntimeError):
    """A worker could not be reached or failed a call; the message names it."""

    def __init__(self, worker: str, message: str):
        super().__init__(f"worker {worker}: {message}")
        self.worker = worker


@dataclasses.dataclass
class WireStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    calls: int = 0

    def snapshot(self) -> WireStats:
        return dataclasses.replace(self)

    def since(self, earlier: WireStats) -> WireStats:
        return WireStats(
            self.bytes_sent - earlier.bytes_sent,
            self.bytes_received - earlier.bytes_received,
            self.calls - earlier.calls,
        )


_ids = itertools.count()


class PreparedComputation:
    """A computation compiled for the native C++ runtime and serialized once."""

    def __init__(self, comp: tff.Computation, name: str):
        self.name = name
        self.key = next(_ids)
        self.result_type = comp.type_signature.result
        compiled = tff.backends.native.desugar_and_transform_to_native(comp)
        self.parameter_type = compiled.type_signature.parameter
        self.value_proto, _ = value_serialization.serialize_value(compiled, compiled.type_signature)

    def serialize_arg(self, arg: object) -> executor_pb2.Value:
        arg = tff.tensorflow.transform_args(arg)
        proto, _ = value_serialization.serialize_value(arg, self.parameter_type)
        return proto

    def deserialize_result(self, proto: executor_pb2.Value) -> object:
        value, _ = value_serialization.deserialize_value(proto, self.result_type)
        value = type_conversions.type_to_py_container(value, self.result_type)
        return tff.tensorflow.transform_result(value)


def _clients_cardinality(num_clients: int) -> list[executor_pb2.Cardinality]:
    return value_serialization.serialize_cardinalities({tff.CLIENTS: num_clients})


class RemoteWorker:
    """One executor service, reached over one gRPC channel."""

    def __init__(
        self,
        address: str,
        *,
        rpc_timeout: float = 600.0,
        connect_timeout: float = 20.0,
        label: str | None = None,
    ):
        self.address = address
        self.label = label or address
        self.rpc_timeout = rpc_timeout
        self.connect_timeout = connect_timeout
        self.stats = WireStats()
        self._lock = threading.Lock()
        self._channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._stub = executor_pb2_grpc.ExecutorGroupStub(self._channel)
        self._executors: dict[int, executor_pb2.ExecutorId] = {}
        self._loaded: dict[tuple[int, int], executor_pb2.ValueRef] = {}

    def __repr__(self) -> str:
        return f"RemoteWorker({self.label})"

    def wait_ready(self, timeout: float | None = None) -> None:
        timeout = self.connect_timeout if timeout is None else timeout
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise WorkerError(
                self.label,
                f"not reachable within {timeout:g}s; is `fedcompose worker` running there "
                "and is the address right?",
            ) from None

    def _rpc(self, method: str, request, timeout: float | None = None):
        call: Callable = getattr(self._stub, method)
        deadline = self.rpc_timeout if timeout is None else timeout
        try:
            response = call(request, timeout=deadline)
        except grpc.RpcError as e:
            raise WorkerError(self.label, _describe_rpc_error(e, method, deadline)) from None
        with self._lock:
            self.stats.bytes_sent += request.ByteSize()
            self.stats.bytes_received += response.ByteSize()
            self.stats.calls += 1
        return response

    def _executor(self, num_clients: int) -> executor_pb2.ExecutorId:
        executor = self._executors.get(num_clients)
        if executor is None:
            request = executor_pb2.GetExecutorRequest(
                cardinalities=_clients_cardinality(num_clients)
            )
            executor = self._rpc("GetExecutor", request, timeout=self.connect_timeout).executor
            self._executors[num_clients] = executor
        return executor

    def _load(self, comp: PreparedComputation, num_clients: int) -> executor_pb2.ValueRef:
        key = (comp.key, num_clients)
        ref = self._loaded.get(key)
        if ref is None:
            request = executor_pb2.CreateValueRequest(
                executor=self._executor(num_clients), value=comp.value_proto
            )
            ref = self._rpc("CreateValue", request).value_ref
            self._loaded[key] = ref
        return ref

    def call(self, comp: PreparedComputation, arg: object, num_clients: int = 0) -> object:
        """Runs `comp(arg)` on this worker with `num_clients` clients."""
        arg_proto = comp.serialize_arg(arg) if comp.parameter_type is not None else None
        return self.call_serialized(comp, arg_proto, num_clients)

    def call_serialized(
        self, comp: PreparedComputation, arg_proto: executor_pb2.Value | None, num_clients: int
    ) -> object:
        executor = self._executor(num_clients)
        fn_ref = self._load(comp, num_clients)
        refs = []
        try:
            arg_ref = None
            if arg_proto is not None:
                arg_ref = self._rpc(
                    "CreateValue",
                    executor_pb2.CreateValueRequest(executor=executor, value=arg_proto),
                ).value_ref
                refs.append(arg_ref)
            result_ref = self._rpc(
                "CreateCall",
                executor_pb2.CreateCallRequest(
                    executor=executor, function_ref=fn_ref, argument_ref=arg_ref
                ),
            ).value_ref
            refs.append(result_ref)
            response = self._rpc(
                "Compute", executor_pb2.ComputeRequest(executor=executor, value_ref=result_ref)
            )
        finally:
            if refs:
                self._dispose(executor, refs)
        return comp.deserialize_result(response.value)

    def _dispose(self, executor: executor_pb2.ExecutorId, refs: list) -> None:
        # If the call already failed or the worker is gone, there is nothing to free.
        with contextlib.suppress(WorkerError):
            self._rpc(
                "Dispose",
                executor_pb2.DisposeRequest(executor=executor, value_ref=refs),
                timeout=min(self.rpc_timeout, 10.0),
            )

    def close(self) -> None:
        for executor in self._executors.values():
            with contextlib.suppress(WorkerError):
                self._rpc(
                    "DisposeExecutor",
                    executor_pb2.DisposeExecutorRequest(executor=executor),
                    timeout=2.0,
                )
        self._executors.clear()
        self._loaded.clear()
        self._channel.close()


def _describe_rpc_error(e: grpc.RpcError, method: str, deadline: float) -> str:
    code = e.code() if isinstance(e, grpc.Call) else None
    details = (e.details() if isinstance(e, grpc.Call) else str(e)) or ""
    details = details.splitlines()[0][:300] if details else ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return (
            f"no answer to {method} within the {deadline:g}s deadline; the worker may be "
            "overloaded or stuck (raise --rpc-timeout if rounds are legitimately this slow)"
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        return (
            f"connection lost during {method} ({details or 'unavailable'}); the worker "
            "process died or the network is down; check its log"
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return f"{method} exceeded a gRPC limit ({details})"
    name = code.name if code is not None else "error"
    return f"{method} failed: {name}: {details}"
