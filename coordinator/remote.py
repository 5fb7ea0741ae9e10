"""A deadline-bound client for TFF's C++ executor service.

TFF's own `RemoteExecutor` makes blocking gRPC calls without deadlines and its
execution contexts retry UNAVAILABLE forever, so a dead worker hangs the
caller. This client speaks the same `ExecutorGroup` protocol with TFF's own
protos and value serialization, but gives every RPC a deadline, turns every
gRPC failure into a `WorkerError` naming the worker, counts bytes on the wire,
and keeps a computation loaded on the worker across rounds instead of
re-sending it with every call.

Besides whole calls (`call`), it exposes the protocol's value references
(`create_value`, `create_struct`, `create_call`, `compute`), so that a caller
can keep values where they are needed next instead of fetching and re-sending
them, and can pass serialized values (`executor_pb2.Value`) from one executor
to another without turning them into Python objects in between.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import grpc
import numpy as np
import tensorflow_federated as tff
from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.python.common_libs import structure
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
_DISPOSE_TIMEOUT = 10.0
_GONE = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)

ValueRef = executor_pb2.ValueRef


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

    @staticmethod
    def total(parts: Iterable[WireStats]) -> WireStats:
        total = WireStats()
        for part in parts:
            total.bytes_sent += part.bytes_sent
            total.bytes_received += part.bytes_received
            total.calls += part.calls
        return total

    def since(self, earlier: WireStats) -> WireStats:
        return WireStats(
            self.bytes_sent - earlier.bytes_sent,
            self.bytes_received - earlier.bytes_received,
            self.calls - earlier.calls,
        )


@dataclasses.dataclass
class CallTiming:
    """Where one call's time went, as seen from the coordinator."""

    setup: float = 0.0
    """Making an executor for a new number of clients and loading the computation."""
    upload: float = 0.0
    """Sending the argument until the worker has parsed it."""
    compute: float = 0.0
    """From starting the call until its result has arrived: the worker's work,
    plus the transfer of the result."""
    new_executor: bool = False


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

    def serialize_element(self, index: int, value: object) -> executor_pb2.Value:
        """One element of a struct parameter, serialized on its own."""
        element_type = self.parameter_type[index]
        if is_strings_at_clients(element_type) and isinstance(value, list | tuple):
            return serialize_strings_at_clients(value, element_type)
        value = tff.tensorflow.transform_args(value)
        proto, _ = value_serialization.serialize_value(value, element_type)
        return proto

    def struct_arg(self, elements: Sequence[executor_pb2.Value]) -> executor_pb2.Value:
        """The struct parameter from its elements' serialized values.

        Lets a caller serialize a large element (the server state) once and
        send it with a different small element (the clients) to each worker.
        """
        names = element_names(self.parameter_type)
        if len(names) != len(elements):
            raise ValueError(f"{self.name} takes {len(names)} arguments, got {len(elements)}")
        arg = executor_pb2.Value()
        for name, value in zip(names, elements, strict=True):
            # One copy; nested constructors would copy the state once per level.
            arg.struct.element.add(name=name).value.CopyFrom(value)
        return arg

    def deserialize_result(self, proto: executor_pb2.Value) -> object:
        value, _ = value_serialization.deserialize_value(proto, self.result_type)
        value = type_conversions.type_to_py_container(value, self.result_type)
        return tff.tensorflow.transform_result(value)


def is_strings_at_clients(type_spec: object) -> bool:
    """Whether `type_spec` is `{str}@CLIENTS`, the type of a round's client tokens."""
    return (
        isinstance(type_spec, tff.FederatedType)
        and type_spec.placement is tff.CLIENTS
        and not type_spec.all_equal
        and isinstance(type_spec.member, tff.TensorType)
        and type_spec.member.dtype.type is np.str_
        and not type_spec.member.shape
    )


def serialize_strings_at_clients(
    values: Sequence[str], type_spec: tff.FederatedType
) -> executor_pb2.Value:
    """What `value_serialization.serialize_value(values, type_spec)` makes for a
    `{str}@CLIENTS` type, in a few microseconds per string instead of about 0.1 ms
    (TFF type-checks and traces every element; a round of 1,000 clients spent
    0.1 s there)."""
    header, member = _strings_at_clients_template(type_spec)
    proto = executor_pb2.Value()
    proto.CopyFrom(header)
    elements = proto.federated.value
    for value in values:
        element = elements.add()
        element.CopyFrom(member)
        element.array.string_list.value[0] = value.encode()
    return proto


@functools.cache
def _strings_at_clients_template(
    type_spec: tff.FederatedType,
) -> tuple[executor_pb2.Value, executor_pb2.Value]:
    """TFF's own serialization of no strings, and of one string's element."""
    header, _ = value_serialization.serialize_value([], type_spec)
    one, _ = value_serialization.serialize_value([""], type_spec)
    return header, one.federated.value[0]


def element_names(struct_type: tff.StructType) -> list[str]:
    """The element names of a struct type, '' for unnamed ones."""
    return [name or "" for name, _ in structure.iter_elements(struct_type)]


def _clients_cardinality(num_clients: int) -> list[executor_pb2.Cardinality]:
    return value_serialization.serialize_cardinalities({tff.CLIENTS: num_clients})


_METHODS = {
    "GetExecutor": (executor_pb2.GetExecutorRequest, executor_pb2.GetExecutorResponse),
    "CreateValue": (executor_pb2.CreateValueRequest, executor_pb2.CreateValueResponse),
    "CreateCall": (executor_pb2.CreateCallRequest, executor_pb2.CreateCallResponse),
    "CreateStruct": (executor_pb2.CreateStructRequest, executor_pb2.CreateStructResponse),
    "Compute": (executor_pb2.ComputeRequest, executor_pb2.ComputeResponse),
    "Dispose": (executor_pb2.DisposeRequest, executor_pb2.DisposeResponse),
    "DisposeExecutor": (
        executor_pb2.DisposeExecutorRequest,
        executor_pb2.DisposeExecutorResponse,
    ),
}
_SERVICE = "/tensorflow_federated.v0.ExecutorGroup/"


class _CountingStub:
    """The `ExecutorGroup` stub, counting the bytes each message takes on the wire.

    Counting where gRPC serializes and parses is free; asking a message for
    its `ByteSize()` afterwards costs as much as serializing it again.
    """

    def __init__(self, channel: grpc.Channel, stats: WireStats, lock: threading.Lock):
        def sent(serialize: Callable[[object], bytes]) -> Callable[[object], bytes]:
            def wrapped(message: object) -> bytes:
                data = serialize(message)
                with lock:
                    stats.bytes_sent += len(data)
                return data

            return wrapped

        def received(parse: Callable[[bytes], object]) -> Callable[[bytes], object]:
            def wrapped(data: bytes) -> object:
                with lock:
                    stats.bytes_received += len(data)
                return parse(data)

            return wrapped

        for method, (request, response) in _METHODS.items():
            setattr(
                self,
                method,
                channel.unary_unary(
                    _SERVICE + method,
                    request_serializer=sent(request.SerializeToString),
                    response_deserializer=received(response.FromString),
                ),
            )


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
        self.unresponsive = False
        """Set once a call found the worker gone or past its deadline: clean-up
        calls to it are skipped, so that a stuck worker costs one deadline, not
        one per value and executor left to free."""
        self._channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._stub = _CountingStub(self._channel, self.stats, self._lock)
        self._executors: dict[int, executor_pb2.ExecutorId] = {}
        self._loaded: dict[tuple[int, int], ValueRef] = {}

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

    def _count_call(self) -> None:
        with self._lock:
            self.stats.calls += 1

    def _rpc(self, method: str, request, timeout: float | None = None):
        call: Callable = getattr(self._stub, method)
        deadline = self.rpc_timeout if timeout is None else timeout
        try:
            response = call(request, timeout=deadline)
        except grpc.RpcError as e:
            if e.code() in _GONE:  # type: ignore[attr-defined]
                self.unresponsive = True
            raise WorkerError(self.label, _describe_rpc_error(e, method, deadline)) from None
        self._count_call()
        return response

    def executor(self, num_clients: int) -> executor_pb2.ExecutorId:
        """The worker's executor for `num_clients` clients, made on first use."""
        executor = self._executors.pop(num_clients, None)
        if executor is None:
            request = executor_pb2.GetExecutorRequest(
                cardinalities=_clients_cardinality(num_clients)
            )
            executor = self._rpc("GetExecutor", request, timeout=self.connect_timeout).executor
        # Most recently used last, for `release_executors`.
        self._executors[num_clients] = executor
        return executor

    def release_executors(self, keep: int, budget: int) -> None:
        """Disposes of the least recently used executors, but never the one for
        `keep` clients, until those left serve at most `budget` clients in all.

        A worker's executor holds its clients' TensorFlow state: for the CNN,
        about 16 MB per client; unbounded, executors kept for reuse run a
        worker out of memory.
        """
        for count in list(self._executors):
            if sum(self._executors) <= budget:
                break
            if count == keep:
                continue
            for key in [k for k in self._loaded if k[1] == count]:
                del self._loaded[key]
            self._dispose_executor(self._executors.pop(count), _DISPOSE_TIMEOUT)

    def _dispose_executor(self, executor: executor_pb2.ExecutorId, timeout: float) -> None:
        """Frees an executor; one that is gone with its worker has nothing to free."""
        if self.unresponsive:
            return
        with contextlib.suppress(WorkerError):
            self._rpc(
                "DisposeExecutor",
                executor_pb2.DisposeExecutorRequest(executor=executor),
                timeout=min(self.rpc_timeout, timeout),
            )

    def client_counts(self) -> set[int]:
        """The client counts this worker already has an executor for."""
        return set(self._executors)

    def is_loaded(self, comp: PreparedComputation, num_clients: int) -> bool:
        return (comp.key, num_clients) in self._loaded

    def load(self, comp: PreparedComputation, num_clients: int) -> ValueRef:
        key = (comp.key, num_clients)
        ref = self._loaded.get(key)
        if ref is None:
            ref = self.create_value(comp.value_proto, num_clients)
            self._loaded[key] = ref
        return ref

    def create_value(self, proto: executor_pb2.Value, num_clients: int = 0) -> ValueRef:
        request = executor_pb2.CreateValueRequest(executor=self.executor(num_clients), value=proto)
        return self._rpc("CreateValue", request).value_ref

    def create_struct(
        self, elements: Sequence[tuple[str, ValueRef]], num_clients: int = 0
    ) -> ValueRef:
        request = executor_pb2.CreateStructRequest(
            executor=self.executor(num_clients),
            element=[
                executor_pb2.CreateStructRequest.Element(name=name, value_ref=ref)
                for name, ref in elements
            ],
        )
        return self._rpc("CreateStruct", request).value_ref

    def create_call(
        self, comp: PreparedComputation, arg: ValueRef | None, num_clients: int = 0
    ) -> ValueRef:
        """Starts `comp(arg)`; the executor computes it while we go on."""
        request = executor_pb2.CreateCallRequest(
            executor=self.executor(num_clients),
            function_ref=self.load(comp, num_clients),
            argument_ref=arg,
        )
        return self._rpc("CreateCall", request).value_ref

    def compute(self, ref: ValueRef, num_clients: int = 0) -> executor_pb2.Value:
        """Waits for `ref` and fetches its value."""
        request = executor_pb2.ComputeRequest(executor=self.executor(num_clients), value_ref=ref)
        return self._rpc("Compute", request).value

    def dispose(self, refs: Sequence[ValueRef], num_clients: int = 0) -> None:
        """Frees values on the worker; a failed disposal (the worker is gone) has
        nothing left to free.

        Waits for the answer, so that no disposal is in flight while the next
        calls arrive: TFF's executor service crashed once (a segfault in a gRPC
        thread) while disposals were sent without waiting, and nothing says it
        is safe with that; waiting costs one small round trip per call.
        """
        executor = self._executors.get(num_clients)
        if executor is None or not refs or self.unresponsive:
            return
        with contextlib.suppress(WorkerError):
            self._rpc(
                "Dispose",
                executor_pb2.DisposeRequest(executor=executor, value_ref=list(refs)),
                timeout=min(self.rpc_timeout, _DISPOSE_TIMEOUT),
            )

    def call_proto(
        self,
        comp: PreparedComputation,
        arg: executor_pb2.Value | None,
        num_clients: int = 0,
        timing: CallTiming | None = None,
    ) -> executor_pb2.Value:
        """Runs `comp(arg)` on serialized values; returns the serialized result."""
        timing = timing if timing is not None else CallTiming()
        t0 = time.perf_counter()
        timing.new_executor = not self.is_loaded(comp, num_clients)
        self.load(comp, num_clients)
        t1 = time.perf_counter()
        timing.setup = t1 - t0
        refs = []
        try:
            arg_ref = None
            if arg is not None:
                arg_ref = self.create_value(arg, num_clients)
                refs.append(arg_ref)
            t2 = time.perf_counter()
            timing.upload = t2 - t1
            result_ref = self.create_call(comp, arg_ref, num_clients)
            refs.append(result_ref)
            result = self.compute(result_ref, num_clients)
            timing.compute = time.perf_counter() - t2
        finally:
            self.dispose(refs, num_clients)
        return result

    def call(self, comp: PreparedComputation, arg: object, num_clients: int = 0) -> object:
        """Runs `comp(arg)` on this worker with `num_clients` clients."""
        arg_proto = comp.serialize_arg(arg) if comp.parameter_type is not None else None
        return comp.deserialize_result(self.call_proto(comp, arg_proto, num_clients))

    def close(self) -> None:
        for executor in self._executors.values():
            self._dispose_executor(executor, 2.0)
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
