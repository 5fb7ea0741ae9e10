"""A run's records, checked fast and without workers: the record writer
(order, back-pressure, failures, batched status), checkpoints (exact,
copied, damaged, of an older format), appended metrics, and damaged
metrics.jsonl lines (issue 23, item 9)."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import threading
import time
import zipfile

import numpy as np
import pytest

from coordinator import run_dir as run_dir_lib
from coordinator.record_writer import RecordWriter
from shared.errors import RunDirError
from tests.fault_tools import PAUSE_AT, PAUSE_FILE, fill, tmpfs


def _row(round_num: int, **extra) -> dict:
    return {
        "round": round_num,
        "finished_at": 1000.0 + round_num,
        "clients": 10,
        "train": {"loss": 1.0 / round_num, "accuracy": 0.05 * round_num},
        "round_seconds": 0.04,
        "live_workers": [0, 1],
        **extra,
    }


def _state(seed: int = 0) -> collections.OrderedDict:
    """A server state's shape: arrays, a NumPy scalar and a Python int."""
    rng = np.random.default_rng(seed)
    return collections.OrderedDict(
        weights=[rng.standard_normal((784, 10)).astype(np.float32), np.zeros(10, np.float32)],
        optimizer=collections.OrderedDict(
            momentum=[rng.standard_normal((784, 10)).astype(np.float32)],
            step=np.int32(seed),
        ),
        round=seed,
    )


def _tff_state(seed: int) -> collections.OrderedDict:
    """`_state` without the Python number, which TFF's manager reads back as int32."""
    state = _state(seed)
    del state["round"]
    return state


def _until(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)


def _same_state(a, b) -> None:
    import tensorflow as tf

    flat_a, flat_b = tf.nest.flatten(a), tf.nest.flatten(b)
    assert len(flat_a) == len(flat_b)
    for x, y in zip(flat_a, flat_b, strict=True):
        assert type(x) is type(y)
        assert np.asarray(x).dtype == np.asarray(y).dtype
        assert np.array_equal(np.asarray(x), np.asarray(y))  # bit for bit, not close


# --- checkpoints ---------------------------------------------------------------------


def test_a_checkpoint_restores_the_state_exactly(tmp_path):
    run = run_dir_lib.RunDirectory(tmp_path)
    for version in (1, 2):
        run.save_checkpoint(version, _state(version))
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "round_2").iterdir()) == ["state.npz"]
    version, state = run.restore(_state(0))
    assert version == 2
    _same_state(state, _state(2))
    assert [p.name for p in tmp_path.rglob("*") if ".tmp-" in p.name] == []


def test_the_state_handed_to_the_writer_is_a_copy(tmp_path):
    run = run_dir_lib.RunDirectory(tmp_path)
    state = _state(3)
    leaves = run_dir_lib.state_leaves(state)
    state["weights"][0][:] = 7.0  # a later round changing the arrays in place
    state["optimizer"]["momentum"][0] += 1.0
    run.save_leaves(3, leaves)
    _same_state(run.restore(_state(0))[1], _state(3))


def test_a_damaged_checkpoint_is_set_aside_and_the_older_one_used(tmp_path, caplog):
    run = run_dir_lib.RunDirectory(tmp_path)
    run.save_checkpoint(1, _state(1))
    run.save_checkpoint(2, _state(2))
    data = tmp_path / "checkpoints" / "round_2" / "state.npz"
    # One flipped byte inside a tensor's data: caught by the zip's CRC-32,
    # not loaded as a wrong model.
    with zipfile.ZipFile(data) as z:
        info = z.getinfo("leaf_0.npy")
    raw = bytearray(data.read_bytes())
    raw[info.header_offset + 200] ^= 0xFF
    data.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        version, state = run.restore(_state(0))
    assert version == 1
    _same_state(state, _state(1))
    assert "round_2 cannot be read" in caplog.text and "CRC" in caplog.text
    assert (tmp_path / "checkpoints" / "unreadable-round_2" / "state.npz").exists()


def test_a_checkpoint_of_another_shape_or_format_is_refused_in_one_line(tmp_path):
    run = run_dir_lib.RunDirectory(tmp_path)
    run.save_checkpoint(1, _state(1))
    bigger = _state(0)
    bigger["weights"][1] = np.zeros(11, np.float32)
    misfit = r"does not fit .*tensor \d+ is float32\[10\], the model's is float32\[11\]"
    with pytest.raises(RunDirError, match=misfit):
        run.restore(bigger)
    path = tmp_path / "checkpoints" / "round_1" / "state.npz"
    np.savez(path, format=np.array("fedcompose-state-99"), leaf_0=np.zeros(1))
    with pytest.raises(RunDirError, match="of format 'fedcompose-state-99'") as info:
        run.restore(_state(0))
    assert "\n" not in str(info.value)


def test_a_checkpoint_in_tffs_older_format_is_still_read(tmp_path):
    """Run directories written before this change hold TFF SavedModels."""
    import tensorflow_federated as tff

    state = _tff_state(4)
    manager = tff.program.FileProgramStateManager(
        str(tmp_path / "checkpoints"), prefix="round_", keep_total=0
    )
    asyncio.run(manager.save(state, 4))
    assert (tmp_path / "checkpoints" / "round_4" / "saved_model.pb").exists()
    version, restored = run_dir_lib.RunDirectory(tmp_path).restore(_tff_state(0))
    assert version == 4
    import tensorflow as tf

    for x, y in zip(tf.nest.flatten(restored), tf.nest.flatten(state), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y))


# --- metrics, appended ---------------------------------------------------------------


def test_metrics_are_appended_not_rewritten(tmp_path):
    run = run_dir_lib.RunDirectory(tmp_path)
    run.record_round(_row(1))
    inodes = {p: os.stat(p).st_ino for p in (run.metrics_csv, run.metrics_jsonl)}
    before = {p: p.read_bytes() for p in inodes}
    run.record_round(_row(2))
    for path, inode in inodes.items():
        assert os.stat(path).st_ino == inode  # the same file: appended to
        assert path.read_bytes().startswith(before[path])
    # A column the header lacks (the first evaluation) rewrites the CSV once.
    run.record_round(_row(3, eval={"loss": 0.5, "accuracy": 0.9}))
    run.record_round(_row(4))
    run.close()
    import csv

    with open(run.metrics_csv, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["round"] for r in table] == ["1", "2", "3", "4"]
    assert [r["eval/accuracy"] for r in table] == ["", "", "0.9", ""]
    assert table[1]["train/loss"] == "0.5"
    assert [r["round"] for r in run.metrics()] == [1, 2, 3, 4]
    events = list((tmp_path / "tensorboard").iterdir())
    assert len(events) == 1 and events[0].name.startswith("events.out.tfevents.")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    # Read as TFF's events were (tf.summary.scalar: tensors of the scalars plugin).
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    accumulator.Reload()
    loss = accumulator.Tensors("train/loss")
    value = tensor_util.make_ndarray
    assert [(e.step, round(float(value(e.tensor_proto)), 6)) for e in loss] == [
        (1, 1.0),
        (2, 0.5),
        (3, 0.333333),
        (4, 0.25),
    ]


def test_an_append_that_fails_leaves_no_part_of_a_line(tmp_path):
    with tmpfs(tmp_path / "fs", "256k") as fs:
        run = run_dir_lib.RunDirectory(fs)
        run.record_round(_row(1))
        before = run.metrics_jsonl.read_bytes()
        filler = fill(fs)
        big = _row(2, notes="x" * 50000)  # more than the free bytes of its last block
        with pytest.raises(RunDirError, match=r"cannot write metrics: .*No space left"):
            run.record_round(big)
        # Whatever was appended before the disk filled is cut back.
        assert run.metrics_jsonl.read_bytes() == before
        assert run.metrics() == [json.loads(before)]
        filler.unlink()
        run.record_round(_row(2))
        assert [r["round"] for r in run.metrics()] == [1, 2]


# --- the record writer ----------------------------------------------------------------


def test_the_writer_writes_rounds_in_order_and_batches_status(tmp_path):
    run = run_dir_lib.RunDirectory(tmp_path)
    run.write_status(state="running", completed_rounds=0, checkpoint_round=0)
    writer = RecordWriter(run, checkpoint_round=0, status_every=3600)
    for r in range(1, 6):
        writer.round_done(_row(r), run_dir_lib.state_leaves(_state(r)) if r % 2 == 0 else None)
    # Written while status.json waits for its interval: batched, not per round.
    _until(lambda: len(run.metrics()) == 5 and run.latest_checkpoint() == 4, "all written")
    assert run.status()["completed_rounds"] == 0
    writer.close()  # and always written at the end
    status = run.status()
    assert (status["completed_rounds"], status["checkpoint_round"]) == (5, 4)
    assert [r["round"] for r in run.metrics()] == [1, 2, 3, 4, 5]
    _same_state(run.restore(_state(0))[1], _state(4))


def test_a_writer_that_falls_behind_holds_the_trainer_back(tmp_path, monkeypatch):
    """Back-pressure: with the writer held, only `depth` rounds wait."""
    marker = tmp_path / "pause"
    monkeypatch.setenv(PAUSE_AT, "record:1")
    monkeypatch.setenv(PAUSE_FILE, str(marker))
    (tmp_path / "run").mkdir()
    run = run_dir_lib.RunDirectory(tmp_path / "run")
    writer = RecordWriter(run, checkpoint_round=0, depth=2)
    writer.round_done(_row(1))
    _until(marker.exists, "the writer holds round 1")
    writer.round_done(_row(2))
    writer.round_done(_row(3))  # the queue is full now
    blocked = threading.Thread(target=writer.round_done, args=(_row(4),), daemon=True)
    blocked.start()
    blocked.join(1.0)
    assert blocked.is_alive()  # waits for room: the writer still holds round 1
    assert run.metrics() == []
    marker.unlink()
    blocked.join(60)
    assert not blocked.is_alive()
    writer.close()
    assert [r["round"] for r in run.metrics()] == [1, 2, 3, 4]


def test_a_failing_writer_stops_the_trainer_with_its_one_line_error(tmp_path):
    run = run_dir_lib.RunDirectory(tmp_path)
    (tmp_path / "metrics.jsonl").mkdir()  # cannot be appended to
    writer = RecordWriter(run, checkpoint_round=0)
    writer.round_done(_row(1))
    with pytest.raises(RunDirError, match="cannot write metrics") as info:
        for r in range(2, 50):  # it surfaces at a hand-over, or at close
            writer.round_done(_row(r))
        writer.close()
    assert "\n" not in str(info.value)
    with pytest.raises(RunDirError):
        writer.close()


def test_an_abandoned_writer_still_writes_what_was_handed_over(tmp_path, monkeypatch):
    """A run stopped by a failure elsewhere keeps every round it finished."""
    marker = tmp_path / "pause"
    monkeypatch.setenv(PAUSE_AT, "record:2")
    monkeypatch.setenv(PAUSE_FILE, str(marker))
    (tmp_path / "run").mkdir()
    run = run_dir_lib.RunDirectory(tmp_path / "run")
    run.write_status(state="running", completed_rounds=0, checkpoint_round=0)
    writer = RecordWriter(run, checkpoint_round=0, status_every=3600)
    writer.round_done(_row(1))
    writer.round_done(_row(2))
    writer.round_done(_row(3), run_dir_lib.state_leaves(_state(3)))
    _until(marker.exists, "the writer holds round 2")
    marker.unlink()
    writer.abandon()
    assert [r["round"] for r in run.metrics()] == [1, 2, 3]
    assert run.latest_checkpoint() == 3
    assert (run.status()["completed_rounds"], run.status()["checkpoint_round"]) == (3, 3)
    assert not writer._thread.is_alive()


def test_an_interrupt_stops_a_writer_held_at_a_pause_point(tmp_path, monkeypatch):
    """What the signal tests rely on: the held writer lets go at the signal,
    leaving no half-written checkpoint, and what waits is dropped."""
    from shared import interrupts

    marker = tmp_path / "pause"
    monkeypatch.setenv(PAUSE_AT, "checkpoint:2")
    monkeypatch.setenv(PAUSE_FILE, str(marker))
    (tmp_path / "run").mkdir()
    run = run_dir_lib.RunDirectory(tmp_path / "run")
    writer = RecordWriter(run, checkpoint_round=0)
    writer.round_done(_row(1), run_dir_lib.state_leaves(_state(1)))
    writer.round_done(_row(2), run_dir_lib.state_leaves(_state(2)))
    writer.round_done(_row(3), run_dir_lib.state_leaves(_state(3)))
    _until(marker.exists, "the writer holds round 2's checkpoint")
    monkeypatch.setattr(interrupts, "_requested", threading.Event())
    interrupts._requested.set()
    writer.abandon()
    assert not writer._thread.is_alive()
    with pytest.raises(KeyboardInterrupt):
        writer.raise_if_failed()
    assert run.checkpoint_versions() == [1]
    assert [r["round"] for r in run.metrics()] == [1, 2]  # round 2's row went first
    assert [p.name for p in run.path.rglob("*") if ".tmp-" in p.name] == []


# --- damaged metrics.jsonl lines (issue 23, item 9) -----------------------------------


def _recorded(tmp_path, rounds: int) -> run_dir_lib.RunDirectory:
    tmp_path.mkdir(exist_ok=True)
    run = run_dir_lib.RunDirectory(tmp_path)
    for r in range(1, rounds + 1):
        run.record_round(_row(r, eval={"loss": 0.5, "accuracy": 0.9}) if r == 2 else _row(r))
    run.close()
    return run


def test_a_damaged_last_jsonl_line_is_rebuilt_from_the_csv_and_kept_aside(tmp_path, caplog):
    run = _recorded(tmp_path, 5)
    data = run.metrics_jsonl.read_bytes()
    lines = data.splitlines(keepends=True)
    damaged = lines[-1][:40] + b"\xff\xfe garbage\n"
    run.metrics_jsonl.write_bytes(b"".join(lines[:-1]) + damaged)
    with caplog.at_level(logging.WARNING):
        run.prepare_metrics(checkpoint_round=5)
    aside = tmp_path / "unreadable-metrics.jsonl"
    assert aside.read_bytes().endswith(damaged)  # the bad bytes are kept
    rows = run.metrics()
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[-1]["rebuilt_from"] == "metrics.csv"
    assert rows[-1]["train"] == {"loss": 0.2, "accuracy": 0.25}
    assert rows[-1]["clients"] == 10
    assert "line 5" in caplog.text and "round(s) 5 rebuilt from metrics.csv" in caplog.text
    assert str(aside) in caplog.text
    # The plot and status read the repaired file: round 5 is there.
    assert run.progress_on_disk()["completed_rounds"] == 5


def test_a_damaged_line_mid_file_is_rebuilt_too(tmp_path):
    run = _recorded(tmp_path, 4)
    lines = run.metrics_jsonl.read_bytes().splitlines(keepends=True)
    lines[1] = b'{"round": 2, "tra\n'
    run.metrics_jsonl.write_bytes(b"".join(lines))
    run.prepare_metrics(checkpoint_round=4)
    rows = run.metrics()
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["eval"] == {"loss": 0.5, "accuracy": 0.9}


def test_a_damaged_round_the_csv_lacks_is_dropped_after_the_checkpoint_or_refused(tmp_path):
    run = _recorded(tmp_path / "after", 3)
    csv_lines = run.metrics_csv.read_bytes().splitlines(keepends=True)
    run.metrics_csv.write_bytes(b"".join(csv_lines[:-1]))  # the CSV lacks round 3
    jsonl = run.metrics_jsonl.read_bytes().splitlines(keepends=True)
    run.metrics_jsonl.write_bytes(b"".join(jsonl[:-1]) + b'{"round": 3, "cl')
    run.prepare_metrics(checkpoint_round=2)  # round 3 is run again
    assert [r["round"] for r in run.metrics()] == [1, 2]
    assert (tmp_path / "after" / "unreadable-metrics.jsonl").exists()

    run = _recorded(tmp_path / "before", 3)
    run.metrics_csv.write_bytes(b"".join(csv_lines[:-1]))
    run.metrics_jsonl.write_bytes(b"".join(jsonl[:-1]) + b'{"round": 3, "cl')
    before = run.metrics_jsonl.read_bytes()
    with pytest.raises(RunDirError, match="line 3 is damaged and round 3 cannot be rebuilt"):
        run.prepare_metrics(checkpoint_round=3)
    assert run.metrics_jsonl.read_bytes() == before  # refused before any change


def test_a_csv_row_cut_short_or_past_the_checkpoint_is_rebuilt_from_the_jsonl(tmp_path):
    run = _recorded(tmp_path, 4)
    data = run.metrics_csv.read_bytes()
    run.metrics_csv.write_bytes(data[:-30])  # a crash mid-append
    run.prepare_metrics(checkpoint_round=3)  # and round 4 comes after the checkpoint
    import csv

    with open(run.metrics_csv, newline="") as f:
        assert [r["round"] for r in csv.DictReader(f)] == ["1", "2", "3"]
    assert [r["round"] for r in run.metrics()] == [1, 2, 3]
    run.record_round(_row(4))  # appends after the rebuilt rows
    with open(run.metrics_csv, newline="") as f:
        assert [r["round"] for r in csv.DictReader(f)] == ["1", "2", "3", "4"]


def test_status_is_current_within_its_interval_without_more_rounds(tmp_path):
    """Batched, but not held back: the last round reaches status.json within
    `status_every` even when no round follows (a long next round)."""
    run = run_dir_lib.RunDirectory(tmp_path)
    run.write_status(state="running", completed_rounds=0, checkpoint_round=0)
    writer = RecordWriter(run, checkpoint_round=0, status_every=0.2)
    try:
        writer.round_done(_row(1), run_dir_lib.state_leaves(_state(1)))
        _until(lambda: run.status().get("completed_rounds") == 1, "status says round 1")
        assert run.status()["checkpoint_round"] == 1 and run.status()["state"] == "running"
        assert writer._thread.is_alive()  # not closed: written on its own
    finally:
        writer.close()
