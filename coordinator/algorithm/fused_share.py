"""A worker's whole share of a round as one TensorFlow call.

TFF's C++ executor runs `up_to_merge` (the mergeable form's client part of a
round) as several TensorFlow calls per client: the client update, the
aggregator's per-client step (the mean's weighting, a clip or a zeroing) and
the aggregate's accumulation, each with a fixed cost of a few tenths of a
millisecond (a session run, its thread hand-offs, its variables created and
initialized). For small models that fixed cost is most of a client's time.

`fuse` turns `up_to_merge` into `(state@SERVER, tokens@SERVER) -> partial@SERVER`
whose only TensorFlow call loops over the worker's client tokens inside the
graph: for each client, the per-client part of `up_to_merge` (its broadcasts,
maps and zips, the TensorFlow computations TFF compiled for them imported
into the loop body), then TFF's own `accumulate`, in client order, starting
from TFF's `zero`; after the loop, TFF's `report`. That is what the C++
executor's `federated_aggregate` computes (a left fold of `accumulate` over
the clients in order), so the partial has the structure `merge` and
`after_merge` take, and its bits are those of the unfused path wherever the
kernels are the same (tests/test_fused.py).

The client update itself is not imported: its graph creates the model's
variables, which a loop body cannot. It is traced again from the same Python
code (`client_step`), the model's variables made once before the loop, one
model per lane (`LANES` clients train at once, as TFF's executor runs a
call's clients concurrently; see `lane_loop`); every client's update
overwrites every model weight with the server's first, so nothing carries
over from one client to the next.

Anything the per-client part does that is not per client (a sum, a mean, a
secure sum across clients before the aggregate, a second aggregate), and any
per-client step that draws random numbers (compression's stochastic
rounding: the draws would differ from a call per client's), raises
`NotFusable`, and the caller runs the unfused path.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_federated.python.common_libs import structure
from tensorflow_federated.python.core.impl.compiler import building_blocks, intrinsic_defs
from tensorflow_federated.python.core.impl.types import type_conversions
from tensorflow_federated.python.core.impl.utils import tensorflow_utils
from tensorflow_federated.python.tensorflow_libs import serialization_utils


class NotFusable(ValueError):
    """`up_to_merge` has a part that cannot run client by client in one loop."""


ClientStep = Callable[[Any, tf.Tensor], Any]
"""`(model weights, token) -> ClientOutput` for one client, traced in the loop."""

_PASS_THROUGH = {
    intrinsic_defs.FEDERATED_BROADCAST.uri,
    intrinsic_defs.FEDERATED_VALUE_AT_SERVER.uri,
    intrinsic_defs.FEDERATED_VALUE_AT_CLIENTS.uri,
    intrinsic_defs.FEDERATED_ZIP_AT_CLIENTS.uri,
    intrinsic_defs.FEDERATED_ZIP_AT_SERVER.uri,
}
"""Intrinsics that, seen from one client, hand their argument on unchanged."""
_MAPS = {
    intrinsic_defs.FEDERATED_APPLY.uri,
    intrinsic_defs.FEDERATED_MAP.uri,
    intrinsic_defs.FEDERATED_MAP_ALL_EQUAL.uri,
}
_EVALS = {intrinsic_defs.FEDERATED_EVAL_AT_CLIENTS.uri, intrinsic_defs.FEDERATED_EVAL_AT_SERVER.uri}


class _Lazy:
    """A local of a block, evaluated once when first used: what a client does
    not need (the aggregate's zero, the server's other parts) is never built in
    the loop body."""

    def __init__(self, thunk: Callable[[], Any]):
        self._thunk: Callable[[], Any] | None = thunk
        self._value: Any = None

    def force(self) -> Any:
        if self._thunk is not None:
            self._value = self._thunk()
            self._thunk = None
        return self._value


class _Interpreter:
    """Evaluates a building block for one client, in the current TF graph.

    Placed values are represented by their member value (this client's, or
    the server's); structures as `structure.Struct`, functions as callables.
    """

    def __init__(self, client_type: tff.FunctionType, client_steps: list[ClientStep]):
        self.client_type = client_type
        self.client_steps = client_steps
        self.lane = 0
        """The lane (whose model) of the client being traced."""
        self._calls = 0

    def eval(self, bb: building_blocks.ComputationBuildingBlock, env: dict[str, _Lazy]) -> Any:
        if isinstance(bb, building_blocks.Reference):
            if bb.name not in env:
                raise NotFusable(f"unbound reference {bb.name}")
            return env[bb.name].force()
        if isinstance(bb, building_blocks.Selection):
            return self.eval(bb.source, env)[bb.as_index()]
        if isinstance(bb, building_blocks.Struct):
            return structure.Struct(
                [(n, self.eval(v, env)) for n, v in structure.iter_elements(bb)]
            )
        if isinstance(bb, building_blocks.Block):
            scope = dict(env)
            for name, value in bb.locals:
                scope[name] = _Lazy(functools.partial(self.eval, value, scope))
            return self.eval(bb.result, scope)
        if isinstance(bb, building_blocks.Lambda):
            return self._lambda(bb, env)
        if isinstance(bb, building_blocks.Call):
            fn = self.eval(bb.function, env)
            return fn() if bb.argument is None else fn(self.eval(bb.argument, env))
        if isinstance(bb, building_blocks.Intrinsic):
            return self._intrinsic(bb.uri)
        if isinstance(bb, building_blocks.CompiledComputation):
            return self._compiled(bb)
        if isinstance(bb, building_blocks.Literal):
            return tf.constant(bb.value, dtype=bb.type_signature.dtype)
        raise NotFusable(f"{type(bb).__name__} is not evaluated client by client")

    def _lambda(self, bb: building_blocks.Lambda, env: dict[str, _Lazy]) -> Callable:
        def call(arg: Any = None) -> Any:
            scope = dict(env)
            if bb.parameter_name is not None:
                scope[bb.parameter_name] = _Lazy(lambda: arg)
            return self.eval(bb.result, scope)

        return call

    def _intrinsic(self, uri: str) -> Callable:
        if uri in _PASS_THROUGH:
            return lambda arg: arg
        if uri in _MAPS:
            return lambda arg: arg[0](arg[1])
        if uri in _EVALS:
            return lambda fn: fn()
        raise NotFusable(f"{uri} combines clients before the aggregate")

    def _compiled(self, bb: building_blocks.CompiledComputation) -> Callable:
        fn_type = bb.type_signature
        if fn_type.is_equivalent_to(self.client_type):
            return self._client

        random = _random_ops(bb.proto)
        if random:
            # Drawn in one loop, the numbers differ from those of a call per
            # client (stochastic rounding, say): the unfused path's, not these.
            raise NotFusable(f"{bb.name} draws random numbers ({', '.join(random)})")

        def call(arg: Any = None) -> Any:
            self._calls += 1
            init_op, result = tensorflow_utils.deserialize_and_call_tf_computation(
                bb.proto,
                arg,
                tf.compat.v1.get_default_graph(),
                f"_fused{self._calls}",
                tf.constant(""),
            )
            if init_op:
                # Variables outside the client update: their initializer would
                # have to run in the loop, before the first use.
                raise NotFusable(f"{bb.name} has variables")
            return result

        return call

    def _client(self, arg: Any) -> structure.Struct:
        param = self.client_type.parameter
        weights = type_conversions.type_to_py_container(arg[0], param[0])
        out = self.client_steps[self.lane](weights, arg[1])
        return structure.from_container(out, recursive=True)


LANES = 4
"""Clients a fused loop trains at once, each on a model (variables) of its own."""


def lane_loop(
    count: tf.Tensor, zero: list[tf.Tensor], client: Callable[[int, tf.Tensor], Any]
) -> list[tf.Tensor]:
    """A left fold over clients `0 .. count - 1`, `LANES` trained at once.

    `client(lane, index)` traces client `index`'s training on `lane`'s model
    and gives `add(acc) -> acc`, its accumulation. Each iteration of the loop
    trains `LANES` clients, one per lane: independent ops, which the executor
    runs concurrently, as TFF's runs a call's clients. It then adds them in
    client order, so the sum's order is a call per client's. The clients left
    over (`count % LANES`) train the same way after the loop, on as many lanes.

    One iteration at a time (`parallel_iterations=1`), and the leftover group
    after the loop: a lane's next client starts once the previous one is
    added. A loop of one client per iteration, its lane switched by the index
    and up to `LANES` iterations in flight, ran 10% slower than a call per
    client for the CNN in `worker_binary` on an idle 2-core machine (1.55
    cores busy against 1.8).
    """

    def group(first: tf.Tensor, width: int, acc: list) -> list:
        adds = [client(lane, first + lane) for lane in range(width)]
        out = list(acc)
        for add in adds:
            # Each addition behind a branch of its own, as when each was a
            # loop iteration. Chained in one body, the results differed from
            # a call per client's by 1.5e-8, the same on every run; the cause
            # is not proven (a rewrite of the chain of adds into one AddN, by
            # Grappler, would do it). Behind the branch they are equal bit for
            # bit (tests/test_fused.py).
            out = tf.cond(first >= 0, functools.partial(add, out), functools.partial(list, out))
        return out

    def body(i: tf.Tensor, *flat: tf.Tensor) -> tuple:
        return (i + LANES, *group(i, LANES, list(flat)))

    grouped = count // LANES * LANES
    done = tf.while_loop(
        lambda i, *_: i < grouped, body, (tf.constant(0), *zero), parallel_iterations=1
    )
    acc = list(done[1:])
    # TFF runs this as a plain graph, without automatic control dependencies:
    # the leftover group must start from the loop's results, or its clients
    # train on lanes the loop is still training on.
    with tf.control_dependencies(acc):
        first = tf.identity(done[0])
    branches: list[Callable[[], list]] = [functools.partial(list, acc)]
    branches += [functools.partial(group, first, width, acc) for width in range(1, LANES)]
    return list(tf.switch_case(count - first, branches))


def _random_ops(proto: Any) -> list[str]:
    """The random-number ops of a compiled TensorFlow computation's graph."""
    graph_def = serialization_utils.unpack_graph_def(proto.tensorflow.graph_def)
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes += list(function.node_def)
    return sorted({n.op for n in nodes if "Random" in n.op or n.op.startswith(("Rng", "Stateful"))})


def _aggregate_call(bb: building_blocks.Lambda) -> tuple[list, building_blocks.Call]:
    """The outer block's locals and its `federated_aggregate` call (the result)."""
    if not isinstance(bb, building_blocks.Lambda):
        raise NotFusable("up_to_merge is not a lambda")
    body = bb.result
    locals_: list = []
    if isinstance(body, building_blocks.Block):
        locals_ = list(body.locals)
        body = body.result
        if isinstance(body, building_blocks.Reference):
            found = [v for n, v in locals_ if n == body.name]
            locals_ = [(n, v) for n, v in locals_ if n != body.name]
            body = found[0] if found else body
    if not (
        isinstance(body, building_blocks.Call)
        and isinstance(body.function, building_blocks.Intrinsic)
        and body.function.uri == intrinsic_defs.FEDERATED_AGGREGATE.uri
    ):
        raise NotFusable("up_to_merge does not end in one federated_aggregate")
    return locals_, body


def _flat(value: Any) -> list:
    return structure.flatten(value) if isinstance(value, structure.Struct) else [value]


def _pack(template: Any, flat: list) -> Any:
    if isinstance(template, structure.Struct):
        return structure.pack_sequence_as(template, flat)
    return flat[0]


def fuse(
    up_to_merge: tff.Computation,
    client_type: tff.FunctionType,
    make_client_step: Callable[[], ClientStep],
) -> tff.Computation:
    """`up_to_merge: (state@SERVER, {str}@CLIENTS) -> partial@SERVER` as
    `(state@SERVER, str[?]@SERVER) -> partial@SERVER`, one TensorFlow call.

    `client_type` is the type of the client update `up_to_merge` maps over
    (model weights, token); `make_client_step()`, called once per call before
    the loop (it makes the model's variables), gives what computes it.
    Raises `NotFusable`.
    """
    bb = up_to_merge.to_building_block()
    param = up_to_merge.type_signature.parameter
    if not (
        isinstance(param, tff.StructType)
        and len(param) == 2
        and param[1].member.is_equivalent_to(tff.TensorType(np.str_))
    ):
        raise NotFusable(f"up_to_merge takes {param}, not (state, client tokens)")
    state_type = param[0].member
    partial_type = up_to_merge.type_signature.result.member
    locals_, aggregate = _aggregate_call(bb)
    values_bb, zero_bb, accumulate_bb, _, report_bb = list(aggregate.argument)
    names = [n for n, _ in structure.iter_elements(param)]

    def scope(interp: _Interpreter, state: Any, token: Any) -> dict[str, _Lazy]:
        arg = structure.Struct([(names[0], state), (names[1], token)])
        env = {bb.parameter_name: _Lazy(lambda: arg)}
        for name, value in locals_:
            env[name] = _Lazy(functools.partial(interp.eval, value, env))
        return env

    @tff.tensorflow.computation(state_type, tff.TensorType(np.str_, [None]))
    def fused_share(state: Any, tokens: tf.Tensor) -> Any:
        interp = _Interpreter(client_type, [make_client_step() for _ in range(LANES)])
        if not isinstance(state, tf.Tensor):
            state = structure.from_container(state, recursive=True)
        outside = scope(interp, state, None)
        zero = interp.eval(zero_bb, outside)
        report = interp.eval(report_bb, outside)

        def client(lane: int, index: tf.Tensor) -> Callable[[list], list]:
            interp.lane = lane
            inside = scope(interp, state, tokens[index])
            value = interp.eval(values_bb, inside)
            accumulate = interp.eval(accumulate_bb, inside)

            def add(flat_acc: list) -> list:
                pair = structure.Struct([(None, _pack(zero, flat_acc)), (None, value)])
                return _flat(accumulate(pair))

            return add

        total = lane_loop(tf.shape(tokens)[0], _flat(zero), client)
        result = report(_pack(zero, total))
        return (
            structure.to_odict_or_tuple(result) if isinstance(result, structure.Struct) else result
        )

    if not fused_share.type_signature.result.is_equivalent_to(partial_type):
        raise NotFusable(
            f"the fused share gives {fused_share.type_signature.result}, not {partial_type}"
        )

    @tff.federated_computation(
        tff.FederatedType(state_type, tff.SERVER),
        tff.FederatedType(tff.TensorType(np.str_, [None]), tff.SERVER),
    )
    def fused(state: Any, tokens: Any) -> Any:
        return tff.federated_map(fused_share, tff.federated_zip((state, tokens)))

    return fused
