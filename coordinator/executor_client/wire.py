"""Bytes on the wire: TFF's `ExecutorGroup` stub, counting what each message takes.

Counting where gRPC serializes and parses is free; asking a message for its
`ByteSize()` afterwards costs as much as serializing it again.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable

import grpc
from tensorflow_federated.proto.v0 import executor_pb2


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


METHODS = {
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
SERVICE = "/tensorflow_federated.v0.ExecutorGroup/"


class CountingStub:
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

        for method, (request, response) in METHODS.items():
            setattr(
                self,
                method,
                channel.unary_unary(
                    SERVICE + method,
                    request_serializer=sent(request.SerializeToString),
                    response_deserializer=received(response.FromString),
                ),
            )
