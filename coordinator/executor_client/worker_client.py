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
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeAlias

import grpc
import tensorflow_federated as tff
from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.python.core.impl.executors import value_serialization

from coordinator.executor_client import connection, probe
from coordinator.executor_client.computations import PreparedComputation
from coordinator.executor_client.wire import CountingStub, WireStats
from shared.errors import FederationError, one_line

_MAX_MESSAGE_BYTES = 2000 * 1000 * 1000
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    # Keepalive pings only during calls, and no more often than the executor
    # service's gRPC server accepts (its default: one per 5 minutes without
    # data, two strikes): pinging every 10 s made it close idle connections
    # with "Too many pings", failing the next call of a healthy worker after a
    # pause of a minute or two. Dead or stuck workers are caught by the call
    # and round deadlines instead.
    ("grpc.keepalive_time_ms", 360_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.enable_retries", 0),
]
_DISPOSE_TIMEOUT = 10.0
_GONE = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)

ValueRef: TypeAlias = executor_pb2.ValueRef


class WorkerError(FederationError):
    """A worker could not be reached or failed a call; the message names it."""

    def __init__(self, worker: str, message: str):
        super().__init__(f"worker {worker}: {message}")
        self.worker = worker


class ComputationFailed(FederationError):
    """TensorFlow raised an error inside a computation on a worker that is
    itself fine: the model, the preprocessing or a client's data is at fault.
    Not a `WorkerError`: the worker is not lost, and running the same clients
    again (a retry) would fail the same way."""

    def __init__(self, worker: str, details: str):
        super().__init__(
            f"the computation failed on worker {worker} (the worker itself is fine): "
            f"{one_line(details, 400)}"
        )
        self.worker = worker


_COMPUTATION_FAILED = "Failed to run computation"
"""How TFF's C++ executor begins the message of an error TensorFlow raised in
a computation (INTERNAL, whatever TensorFlow's own code was)."""


def _failed_computation(e: grpc.RpcError) -> str | None:
    """The TensorFlow error a worker's computation raised, if that is what `e` is."""
    if not isinstance(e, grpc.Call) or e.code() not in (
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.INVALID_ARGUMENT,
    ):
        return None
    details = e.details() or ""
    if _COMPUTATION_FAILED not in details or "ancelled" in details:
        return None  # a call cancelled under it (a stop) is no error of the computation
    message = details.split(_COMPUTATION_FAILED, 1)[1].lstrip(": ")
    # What follows is where in TFF's and TensorFlow's graphs: noise to a user.
    for tail in (" [[{{", " while evaluating "):
        message = message.split(tail, 1)[0]
    return message


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
        tls: connection.ClientTLS | None = None,
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
        self.abandoned = ""
        """Why the coordinator gave up on this worker (`abandon`); empty while it has not."""
        self.tls = tls
        self._executors: dict[int, executor_pb2.ExecutorId] = {}
        self._loaded: dict[tuple[int, int], ValueRef] = {}
        self._local = threading.local()
        self._connect()

    def _connect(self) -> None:
        """Opens the channel (and its counting stub) that every call goes through."""
        self._channel = connection.open_channel(self.address, self.tls, _CHANNEL_OPTIONS)
        self._stub = CountingStub(self._channel, self.stats, self._lock)

    def __repr__(self) -> str:
        return f"RemoteWorker({self.label})"

    def wait_ready(self, timeout: float | None = None, *, retry_refused: bool = True) -> None:
        """Waits until the channel connects, or raises one line saying why it does not.

        gRPC alone cannot tell a dead worker from a wrong port, a TLS mismatch or
        a rejected certificate (all "unavailable"). Whenever the channel is not
        ready after a short wait, a direct probe (`probe.probe`) says why;
        an answer that waiting cannot change (wrong protocol, any TLS failure,
        and a refused connection unless `retry_refused`: a worker may still be
        starting) fails at once instead of after `timeout`.
        """
        timeout = self.connect_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        wait = 0.5
        while True:
            remaining = deadline - time.monotonic()
            try:
                grpc.channel_ready_future(self._channel).result(
                    timeout=max(0.0, min(wait, remaining))
                )
                self._check_peer(max(1.0, min(3.0, deadline - time.monotonic())))
                return
            except grpc.FutureTimeoutError:
                pass
            wait = 1.0
            remaining = deadline - time.monotonic()
            diagnosis = probe.probe(self.address, self.tls, timeout=min(3.0, max(remaining, 1.0)))
            if diagnosis.final or (diagnosis.kind == probe.REFUSED and not retry_refused):
                raise WorkerError(self.label, diagnosis.message)
            if time.monotonic() >= deadline:
                if diagnosis.ok:
                    message = (
                        f"{diagnosis.message}, but its gRPC channel did not connect within "
                        f"{timeout:g}s; check the worker's log"
                    )
                else:
                    message = f"{diagnosis.message} (waited {timeout:g}s)"
                raise WorkerError(self.label, message)

    def _check_peer(self, timeout: float) -> None:
        """gRPC checked the worker's certificate against the CA and the address
        only: here, that it is the site provisioned at that address and not
        revoked (`probe.probe`, which compares both with the coordinator's kit)."""
        if self.tls is None or not self.tls.checks_peer:
            return
        diagnosis = probe.probe(self.address, self.tls, timeout=timeout)
        # Only these two: the channel is up, so a slow probe (a loaded machine)
        # is no reason to refuse the worker.
        if diagnosis.kind in (probe.WRONG_SITE, probe.REVOKED):
            raise WorkerError(self.label, diagnosis.message)

    def _count_call(self) -> None:
        with self._lock:
            self.stats.calls += 1

    @contextlib.contextmanager
    def deadline(self, at: float, why: str) -> Iterator[None]:
        """Calls made by this thread inside the block end by `at` (`time.monotonic()`),
        or sooner by their own deadline; `why` names that deadline in the error."""
        previous = getattr(self._local, "deadline", None)
        self._local.deadline = (at, why)
        try:
            yield
        finally:
            self._local.deadline = previous

    def _rpc(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """`request` and the answer are protobuf messages of `executor_pb2`."""
        call: Callable = getattr(self._stub, method)
        deadline = self.rpc_timeout if timeout is None else timeout
        why = None
        bound = getattr(self._local, "deadline", None)
        if bound is not None and bound[0] - time.monotonic() < deadline:
            deadline, why = max(0.001, bound[0] - time.monotonic()), bound[1]
        try:
            response = call(request, timeout=deadline)
        except grpc.RpcError as e:
            if e.code() in _GONE:
                self.unresponsive = True
            if why is not None and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise WorkerError(self.label, f"no answer to {method} {why}") from None
            failure = _failed_computation(e)
            if failure is not None:
                raise ComputationFailed(self.label, failure) from None
            if e.code() == grpc.StatusCode.CANCELLED and self.abandoned:
                raise WorkerError(self.label, f"{method} abandoned: {self.abandoned}") from None
            raise WorkerError(self.label, _describe_rpc_error(e, method, deadline)) from None
        except ValueError:  # "Cannot invoke RPC on closed channel!"
            raise WorkerError(
                self.label, f"{method} not sent: {self.abandoned or 'the channel is closed'}"
            ) from None
        self._count_call()
        return response

    def abandon(self, why: str) -> None:
        """Gives up on the worker now: closes the channel, which ends every call in
        flight to it at once (a stopped worker would otherwise hold each caller until
        its deadline), and skips clean-up calls to it from then on."""
        self.abandoned = why or "abandoned"
        self.unresponsive = True
        self._channel.close()

    def reconnect(self) -> list[executor_pb2.ExecutorId]:
        """A fresh channel to a worker that came back, with nothing cached from before.

        What the worker held (executors, loaded computations, values) is in an
        unknown state: gone if it restarted, stale if it was only stopped. Returns
        the executors this client had, for the caller to free on the worker
        (`dispose_stale`) before making any new one: the service names executors
        by their client count and counts references to them, so a stale reference
        would keep an old executor alive, or be mistaken for a new one.
        """
        stale = list(self._executors.values())
        self._executors.clear()
        self._loaded.clear()
        with contextlib.suppress(Exception):
            self._channel.close()
        self._connect()
        self.unresponsive = False
        self.abandoned = ""
        return stale

    def dispose_stale(self, executors: Sequence[executor_pb2.ExecutorId]) -> None:
        """Frees executors a previous connection made (see `reconnect`); one the
        worker no longer has (it restarted) has nothing to free."""
        for executor in executors:
            self._dispose_executor(executor, _DISPOSE_TIMEOUT)

    def executor(self, num_clients: int) -> executor_pb2.ExecutorId:
        """The worker's executor for `num_clients` clients, made on first use.

        Which executors to keep is the caller's policy
        (`coordinator.rounds.executor_reuse`); this only makes and frees them.
        """
        executor = self._executors.get(num_clients)
        if executor is None:
            request = executor_pb2.GetExecutorRequest(
                cardinalities=_clients_cardinality(num_clients)
            )
            executor = self._rpc("GetExecutor", request, timeout=self.connect_timeout).executor
            self._executors[num_clients] = executor
        return executor

    def dispose_executor(self, num_clients: int) -> None:
        """Frees the executor for `num_clients` clients and what was loaded into it."""
        executor = self._executors.pop(num_clients, None)
        for key in [k for k in self._loaded if k[1] == num_clients]:
            del self._loaded[key]
        if executor is not None:
            self._dispose_executor(executor, _DISPOSE_TIMEOUT)

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
        # A copy: a round that ended by an exception can leave calls running on
        # other threads, which make executors meanwhile (iterating the dict
        # itself then raised "dictionary changed size", hiding the real error).
        executors = list(self._executors.copy().values())
        self._executors.clear()
        for executor in executors:
            self._dispose_executor(executor, 2.0)
        self._loaded.clear()
        self._channel.close()


def _describe_rpc_error(e: grpc.RpcError, method: str, deadline: float) -> str:
    code = e.code() if isinstance(e, grpc.Call) else None
    details = (e.details() if isinstance(e, grpc.Call) else str(e)) or ""
    details = one_line(details, 300)
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
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return (
            f"answers gRPC but is not a TFF executor service (it does not implement "
            f"{method}); check the address"
        )
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return f"refused {method}: {details or code.name}"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return f"{method} exceeded a gRPC limit ({details})"
    name = code.name if code is not None else "error"
    return f"{method} failed: {name}: {details}"
