"""A worker's share of a round as one TensorFlow call (issue 22, items 1-2).

`coordinator/algorithm/fused_share.py` turns the mergeable form's
`up_to_merge` into one call that loops over the worker's clients. Its rounds
must give the weights of the unfused path (a call per client and step) bit
for bit, for the default algorithm and every block it fuses, and those of
TFF's single-process run; what it cannot fuse must be refused (and then run
unfused, said once in the log).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import tensorflow_federated as tff

from coordinator.algorithm import fused_share
from coordinator.rounds import prepared, round_executor
from tests.test_blocks_match_tff import (
    MODEL_DELTA,
    QUANTIZED,
    ROBUST_FIXED_NORMS,
    _finish,
    _run,
    _start_distributed,
    _start_reference,
)

VARIANTS = {
    "default": {},
    "prox_adam_uniform": {
        **MODEL_DELTA,
        "client_optimizer": "adam",
        "proximal_mu": 0.5,
        "weighting": "uniform",
    },
    "robust_fixed": ROBUST_FIXED_NORMS,
    "robust_adaptive": {"aggregator": "robust"},
    "compression": {"aggregator": "compression", **QUANTIZED},
    "dp_adaptive": {"aggregator": "dp_adaptive", "noise_multiplier": 0.0},
}


@pytest.mark.slow
def test_fused_rounds_equal_unfused_bit_for_bit_and_tff(workers2, shards2, tmp_path):
    """Each variant 3 rounds over two real workers, fused and unfused, in one
    coordinator; the default also in TFF's local context, and once more in
    calls of at most 5 clients (a memory budget) with an evaluation."""
    runs = []
    for name, blocks in VARIANTS.items():
        runs.append({**_run(f"{name}_fused", blocks), "fused": True})
        runs.append({**_run(f"{name}_unfused", blocks), "fused": False})
    runs.append({**_run("default_pieces", {}), "clients_per_call": 5, "evaluate": True})
    runs.append({**_run("default_pieces_unfused", {}), "fused": False, "evaluate": True})
    dist_out, ref_out = tmp_path / "fused-distributed.npz", tmp_path / "fused-reference.npz"
    # Both at once: each is mostly one busy core, tracing and compiling.
    procs = [
        _start_distributed(workers2, runs, dist_out),
        _start_reference(shards2, [_run("default_reference", {})], ref_out),
    ]
    try:
        for proc in procs:
            _finish(proc)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    dist, ref = dict(np.load(dist_out)), dict(np.load(ref_out))
    evaluations = json.loads(dist_out.with_suffix(".json").read_text())
    for name in VARIANTS:
        for i in (0, 1):
            a, b = dist[f"{name}_fused__trainable_{i}"], dist[f"{name}_unfused__trainable_{i}"]
            assert np.array_equal(a, b), f"{name} weights {i}: max |diff| {np.abs(a - b).max()}"
    for i in (0, 1):
        fused = dist[f"default_fused__trainable_{i}"]
        tff_local = ref[f"default_reference__trainable_{i}"]
        assert np.abs(fused - tff_local).max() <= 1e-5
        # Pieces are merged in another order than one call's sum: equal within 1e-5.
        pieces = dist[f"default_pieces__trainable_{i}"]
        assert np.abs(pieces - fused).max() <= 1e-5
    a, b = (evaluations[n]["evaluation"] for n in ("default_pieces", "default_pieces_unfused"))
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1e-5)


def _sums_clients_before_the_aggregate() -> tff.Computation:
    @tff.tensorflow.computation(np.str_)
    def length(token):
        import tensorflow as tf

        return tf.cast(tf.strings.length(token), np.float32)

    @tff.tensorflow.computation(np.float32, np.float32)
    def add(a, b):
        return a + b

    @tff.federated_computation(
        tff.FederatedType(np.float32, tff.SERVER), tff.FederatedType(np.str_, tff.CLIENTS)
    )
    def up_to_merge(state, tokens):
        lengths = tff.federated_map(length, tokens)
        total = tff.federated_broadcast(tff.federated_sum(lengths))
        shifted = tff.federated_map(add, tff.federated_zip((lengths, total)))
        return tff.federated_aggregate(shifted, np.float32(0.0), add, add, length_identity())

    return up_to_merge


def length_identity() -> tff.Computation:
    @tff.tensorflow.computation(np.float32)
    def identity(x):
        return x

    return identity


def test_a_share_that_combines_clients_before_its_aggregate_is_not_fused():
    with pytest.raises(fused_share.NotFusable, match="combines clients"):
        fused_share.fuse(
            _sums_clients_before_the_aggregate(),
            tff.FunctionType(tff.StructType([np.float32, np.str_]), np.float32),
            lambda: lambda weights, token: None,
        )


def test_the_log_says_once_why_a_share_is_not_fused(caplog):
    algorithm = prepared.PreparedAlgorithm(
        None, {}, description="a user's process", fused_note="unused"
    )
    with caplog.at_level(logging.INFO, logger="fedcompose.coordinator"):
        round_executor._log_share_kind(algorithm, wanted=True, fused=False)
        round_executor._log_share_kind(
            prepared.PreparedAlgorithm(None, {}, fused_note="x"), wanted=False, fused=False
        )
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "training: TensorFlow calls per client, not fused (a user's process is not fused)",
        "training: TensorFlow calls per client, not fused (the fused share is turned off)",
    ]


def test_the_bench_reports_both_paths_against_the_floor():
    from deploy.bench import report

    def row(model: str, clients: int, system: str, seconds: float, **more) -> report.Row:
        workers = None if system in (report.KERAS, report.CLIENT_LOOP) else 1
        r = report.Row(model, clients, system, workers)
        r.rounds = [
            {"round": n, "seconds": seconds, "examples": 24 * clients, **more} for n in (0, 1)
        ]
        return r

    rows = [
        row(
            "linear",
            1000,
            report.KERAS,
            0.25,
            client_batches_seconds=0.3,
            loop_seconds=0.25,
            batches=1200,
            client_batches=3000,
        ),
        row("linear", 1000, report.CLIENT_LOOP, 0.4, no_shuffle_seconds=0.35, input_seconds=0.3),
        row("linear", 1000, report.FEDCOMPOSE, 0.45),
        row("linear", 1000, report.FEDCOMPOSE_UNFUSED, 1.25),
        row("cnn", 100, report.KERAS, 2.0),
        row("cnn", 100, report.FEDCOMPOSE, 2.2),
        row("cnn", 100, report.FEDCOMPOSE_UNFUSED, 2.1),
    ]
    summaries = {r.key: report.summarize(r) for r in rows}
    report.add_ratios(rows, summaries)
    fused = summaries[("linear", 1000, report.FEDCOMPOSE, 1)]
    assert fused["per_client_ms"] == pytest.approx(0.2)
    found = {t["model"]: t for t in report.fused_targets(rows, summaries)}
    assert found["linear"]["met"] and found["linear"]["xfloor"] == pytest.approx([5.0, 1.8])
    assert found["linear"]["per_client_ms"] == pytest.approx([1.0, 0.2])
    assert not found["cnn"]["met"]  # fused slower than unfused here
    # What bounds the fused path from below, as multiples of the floor.
    assert found["linear"]["bounds"] == pytest.approx(
        {
            "client_batches": 1.2,
            "batch_count": 2.5,
            "client_loop_no_shuffle": 1.4,
            "client_loop": 1.6,
            "client_input": 1.2,
        }
    )
    # No client loop and no client-by-client timing for the CNN: nothing shown.
    assert found["cnn"]["bounds"] == {"client_batches": None}
    text = report.targets_text(list(found.values()))
    assert "unfused -> fused" in text
    assert (
        "without an executor: clients' datasets read alone x1.20, client loop without shuffle "
        "x1.40, client loop x1.60, Keras batched client by client x1.20 its union loop" in text
    )
    assert text.count("without an executor") == 1


@pytest.mark.slow
def test_stochastic_rounding_is_not_fused():
    """Its random draws in one loop would differ from a call per client's."""
    from coordinator import algorithm
    from coordinator.algorithm import AlgorithmSpec
    from coordinator.rounds.mergeable import compile_form

    spec = AlgorithmSpec.from_dict(
        {
            "blocks": {
                "aggregator": "compression",
                "quantization_rounding": "stochastic",
                # Below the linear model's 7,840 weights: quantized, so rounded at random.
                "quantization_threshold": 1000,
            }
        }
    )
    form = compile_form(algorithm.build_process(spec).next, "train")
    with pytest.raises(fused_share.NotFusable, match="random numbers"):
        algorithm.fused_train_share(spec, form.up_to_merge)


@pytest.mark.parametrize("count", [0, 1, 3, 4, 5, 9])
def test_the_lane_loop_folds_every_client_once_in_client_order(count):
    """`LANES` clients trained at once, added in client order; the ones left
    over in a last group. An order-sensitive fold (acc * 3 + index + 1) gives
    the sequential left fold's result only if every client is added once, in
    order."""
    import tensorflow as tf

    lanes_traced = []

    def client(lane, index):
        lanes_traced.append(lane)
        value = tf.cast(index, tf.int64) + 1
        return lambda acc: [acc[0] * 3 + value]

    @tf.function
    def fold(n):
        return fused_share.lane_loop(n, [tf.constant(0, tf.int64)], client)[0]

    expected = 0
    for index in range(count):
        expected = expected * 3 + index + 1
    assert int(fold(tf.constant(count))) == expected
    # Every lane in the loop; a leftover group of 1 to LANES - 1 on as many lanes.
    leftover = [lane for width in range(1, fused_share.LANES) for lane in range(width)]
    assert lanes_traced == [*range(fused_share.LANES), *leftover]


def test_no_two_clients_of_a_lane_overlap_in_a_plain_graph():
    """TFF runs the fused share as a plain graph in a session, with no automatic
    control dependencies: only data orders one client's use of its lane's model
    before the next client's. Each client here writes its index into its lane's
    variable, works a while on what it reads back, and reads it again: a client
    that overlapped another on its lane reads the other's index. (The leftover
    clients, started from the count alone, trained on lane 0 while the
    grouped loop still did: 1 of 5 runs of 5 clients read a wrong index.)"""
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        lanes = [tf.Variable(-1.0, name=f"lane{k}") for k in range(fused_share.LANES)]
        work = tf.random.stateless_uniform([300, 300], seed=[1, 2])

        def client(lane, index):
            wrote = lanes[lane].assign(tf.cast(index, tf.float32))
            with tf.control_dependencies([wrote]):
                # min(x, 0) is 0 here, but not to Grappler, which would fold a
                # product by zero and so skip the work.
                product = work * (1.0 + tf.minimum(lanes[lane].read_value(), 0.0))
                for _ in range(40):
                    product = tf.linalg.matmul(product, work) * 1e-2
            with tf.control_dependencies([product]):
                read = lanes[lane].read_value()
            read += tf.minimum(tf.reduce_sum(tf.abs(product)), 0.0)
            return lambda acc: [acc[0] * 2 + read]

        count = tf.compat.v1.placeholder(tf.int32, [])
        folded = fused_share.lane_loop(count, [tf.constant(0.0)], client)[0]
        init = tf.compat.v1.global_variables_initializer()
    with tf.compat.v1.Session(graph=graph) as session:
        session.run(init)
        for n in (fused_share.LANES + 1, 2 * fused_share.LANES + 3):
            expected = 0.0
            for index in range(n):
                expected = expected * 2 + index
            for _ in range(15):
                assert session.run(folded, {count: n}) == expected, n
