"""The run directory's rules, checked fast: its lock, its files, its status,
and the refusals that need no worker (through the real command line)."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from coordinator import run_dir as run_dir_lib
from shared import files
from shared.errors import RunDirError
from tests.conftest import ROOT, fedcompose
from tests.fault_tools import assert_one_line_error, fill, snapshot, tmpfs

HOLD_LOCK = """
import sys, time
from pathlib import Path
from coordinator import run_dir
with run_dir.locked(Path(sys.argv[1]), "train"):
    print("locked", flush=True)
    time.sleep(600)
"""


def _hold_lock(directory: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(directory)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


# --- the lock ------------------------------------------------------------------------


def test_a_held_run_dir_is_refused_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "run"
    holder = _hold_lock(run_dir)
    try:
        (run_dir / "status.json").write_text('{"state": "running"}')
        before = snapshot(run_dir)
        for command in ("train", "run"):
            args = ["--addresses", "localhost:9"] if command == "train" else ["--workers", "1"]
            result = fedcompose(command, *args, "--run-dir", str(run_dir), timeout=120)
            assert_one_line_error(
                result, command, 5, f"--run-dir {run_dir} is in use by another fedcompose",
                f"pid {holder.pid}",
            )  # fmt: skip
        assert snapshot(run_dir) == before  # not even a log line
        with (
            pytest.raises(RunDirError, match="in use by another fedcompose"),
            run_dir_lib.locked(run_dir, "train"),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()
    # The kernel drops a SIGKILLed holder's lock: nothing is left stuck.
    with run_dir_lib.locked(run_dir, "train"), run_dir_lib.locked(run_dir, "train"):
        pass  # re-entrant in one process


def test_lock_takes_the_temporaries_killed_writers_left(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "round_3_temp1234" / "variables").mkdir(parents=True)
    (run_dir / "checkpoints" / ".staging.tmp-1").mkdir()
    (run_dir / f".status.json.tmp-{os.getpid()}").write_text("{")  # a recycled pid too
    (run_dir / "metrics.csv_temp9876").write_text("round\n")
    (run_dir / "shards").mkdir()
    (run_dir / "shards" / ".manifest.json.tmp-99999999").write_text("")
    (run_dir / "checkpoints" / "round_2").mkdir()
    with run_dir_lib.locked(run_dir, "train") as removed:
        assert len(removed) == 5
    left = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*"))
    assert left == [".lock", "checkpoints", "checkpoints/round_2", "shards"]


# --- paths that are not usable run directories ---------------------------------------


def test_run_dir_paths_that_cannot_be_used(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (a_file, "exists and is not a directory"),
        (a_file / "sub", "cannot be created"),
        (Path("/proc/version"), "exists and is not a directory"),
    ]
    for path, message in cases:
        result = fedcompose("train", "--addresses", "localhost:9", "--run-dir", str(path))
        assert_one_line_error(result, "train", 5, f"--run-dir {path}", message)
    bad = os.fsencode(tmp_path) + b"/run\xff"
    argv = ["train", "--addresses", "localhost:9", "--run-dir", os.fsdecode(bad)]
    result = subprocess.run(
        [sys.executable, "-m", "deploy.cli", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line_error(result, "train", 2, "--run-dir", "is not UTF-8")
    assert not os.path.exists(bad)


def test_a_directory_that_holds_something_else_is_not_taken_for_a_run(tmp_path):
    """`--run-dir .` in a project (or `~`) wrote config.toml, status.json and
    metrics over the files of the same names there, and the start-up sweep
    searched the whole tree below it and deleted what looked like temporaries."""
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "config.toml").write_text("[tool]\nname = 'mine'\n")
    (project / "README.md").write_text("mine")
    (project / "src" / ".editor.tmp-1").write_text("an editor's, not ours")
    before = snapshot(project)
    for command, args in (("train", ["--addresses", "localhost:9"]), ("run", ["--workers", "1"])):
        result = fedcompose(command, *args, "--run-dir", str(project), timeout=120)
        assert_one_line_error(
            result, command, 5, f"--run-dir {project} is not a fedcompose run directory",
            "README.md, src",
        )  # fmt: skip
        assert snapshot(project) == before
    # A run's own directory stays usable with anything added to it later.
    run = tmp_path / "run"
    with run_dir_lib.locked(run, "train"):
        pass
    (run / "notes.txt").write_text("mine")
    (run / "checkpoints").mkdir()
    with run_dir_lib.locked(run, "train"):
        pass
    old = tmp_path / "old-run"  # before .lock existed: only what a run keeps
    (old / "checkpoints").mkdir(parents=True)
    (old / "status.json").write_text("{}")
    (old / ".status.json.tmp-99").write_text("{")
    with run_dir_lib.locked(old, "train") as removed:
        assert removed == [old / ".status.json.tmp-99"]


def test_bench_run_dir_that_is_a_file(tmp_path):
    """It said only "File exists", exit 1."""
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for extra in ((), ("--chaos",)):
        result = fedcompose("bench", "--quick", *extra, "--run-dir", str(a_file), timeout=120)
        assert_one_line_error(result, "bench", 5, f"--run-dir {a_file} exists and is not a dir")


def test_read_only_and_foreign_run_dirs(tmp_path):
    with tmpfs(tmp_path / "ro", "1m") as fs:
        (fs / "run").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        for path, message in (
            (fs / "run", "Read-only file system"),
            (fs / "new", "cannot be created"),
        ):
            result = fedcompose("train", "--addresses", "localhost:9", "--run-dir", str(path))
            assert_one_line_error(result, "train", 5, str(path), message)
    hidden = tmp_path / "hidden"  # pytest's own tmp_path is private to root
    owned = Path(tempfile.mkdtemp(prefix="fedcompose-test-owned-"))  # searchable, not writable
    setpriv = shutil.which("setpriv")
    assert setpriv, "this test runs fedcompose as user nobody with setpriv (util-linux)"
    as_nobody = [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    result = subprocess.run(
        [*as_nobody, sys.executable, "-m", "deploy.cli", "train", "--addresses", "localhost:9",
         "--run-dir", str(owned)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    try:
        assert_one_line_error(result, "train", 5, str(owned / ".lock"), "Permission denied")
        result = subprocess.run(
            [*as_nobody, sys.executable, "-m", "deploy.cli", "train", "--addresses", "localhost:9",
             "--run-dir", str(hidden)],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert_one_line_error(result, "train", 5, str(hidden), "Permission denied")
    finally:
        owned.rmdir()


def test_run_dir_entries_of_the_wrong_kind_are_refused_before_any_write(tmp_path):
    cases = {
        "logs": "file",
        "tensorboard": "file",
        "checkpoints": "file",
        "status.json": "dir",
        "config.toml": "dir",
        "metrics.jsonl": "dir",
    }
    for name, kind in cases.items():
        run_dir = tmp_path / name
        run_dir.mkdir()
        if kind == "file":
            (run_dir / name).write_text("x")
        else:
            (run_dir / name).mkdir()
        before = snapshot(run_dir, skip=("logs", ".lock"))
        result = fedcompose("train", "--addresses", "localhost:9", "--run-dir", str(run_dir))
        assert_one_line_error(result, "train", 5, str(run_dir / name))
        assert snapshot(run_dir, skip=("logs", ".lock")) == before, name


def test_corrupt_run_dir_files_are_refused_in_one_line(tmp_path):
    cases = [
        ("config.toml", b"\xff\xfe[model", "not UTF-8"),
        ("trained_on.json", b"[1", "is corrupt"),
        # Valid JSON of another shape was a TypeError traceback.
        ("trained_on.json", b'{"clients_per_shard": 5, "shards_built": 7}', "is corrupt"),
    ]
    for n, (name, content, message) in enumerate(cases):
        run_dir = tmp_path / f"case{n}"
        run_dir.mkdir()
        (run_dir / name).write_bytes(content)
        (run_dir / "checkpoints" / "round_1").mkdir(parents=True)
        result = fedcompose(
            "run", "--workers", "1", "--run-dir", str(run_dir), "--ready-timeout", "5"
        )
        assert_one_line_error(result, "run", 5, str(run_dir / name), message)
        assert "ready on" not in result.stderr  # refused before any worker started


def test_a_run_with_checkpoints_and_no_data_record_is_refused(tmp_path):
    """Deleting trained_on.json turned the data-identity check off: the run
    resumed on another build of the data without a word and recorded that
    build as its own. Refused before anything starts; a flag accepts it."""
    from shared.ports import free_ports

    (port,) = free_ports(1)  # nobody listens: a command that gets that far fails to connect
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "round_2").mkdir(parents=True)
    train = ("train", "--addresses", f"127.0.0.1:{port}", "--run-dir", str(run_dir))
    result = fedcompose(*train, "--connect-timeout", "2", timeout=120)
    assert_one_line_error(
        result, "train", 5, "no trained_on.json", "--accept-unrecorded-data", "up to round 2"
    )
    result = fedcompose("run", "--workers", "1", "--run-dir", str(run_dir), timeout=120)
    assert_one_line_error(result, "run", 5, "no trained_on.json")
    assert not (run_dir / "shards").exists(), "refused before shards were built"
    accepted = fedcompose(*train, "--connect-timeout", "2", "--accept-unrecorded-data", timeout=120)
    # Past the check: it went on to dial the workers.
    assert_one_line_error(accepted, "train", 4, f"127.0.0.1:{port}")


def test_a_new_run_dir_refused_early_is_not_left_behind(tmp_path, shards2, workers2):
    """`train --clients-per-round 1e9` was refused only after connecting, and left
    `.lock` and `logs/` in the new run directory (which then looked like a run).
    `run` knows its shards' clients from their manifests: it refuses before any
    worker starts."""
    from shared.ports import free_ports

    (port,) = free_ports(1)
    new = tmp_path / "new"
    result = fedcompose(
        "train", "--addresses", f"127.0.0.1:{port}", "--run-dir", str(new),
        "--connect-timeout", "2", timeout=120,
    )  # fmt: skip
    assert_one_line_error(result, "train", 4)
    assert not new.exists(), sorted(p.name for p in new.iterdir())
    addresses = ",".join(w.address for w in workers2)
    result = fedcompose(
        "train", "--addresses", addresses, "--clients-per-round", "1000000000",
        "--run-dir", str(new), timeout=300,
    )  # fmt: skip
    assert_one_line_error(result, "train", 2, "more than the 60 clients the workers host")
    assert not new.exists(), sorted(p.name for p in new.iterdir())
    empty = tmp_path / "empty"
    empty.mkdir()
    result = fedcompose(
        "run", "--shards-dir", str(shards2[0].parent), "--clients-per-round", "1000000000",
        "--run-dir", str(empty), timeout=120,
    )  # fmt: skip
    assert_one_line_error(result, "run", 2, "--clients-per-round 1000000000 is more than the 60")
    assert not empty.exists()
    assert "ready on" not in result.stderr and "starting" not in result.stderr


# --- status, atomic files, failures named ---------------------------------------------


def test_status_agrees_with_disk_and_drops_old_errors(tmp_path):
    run = run_dir_lib.RunDirectory(tmp_path)
    run.write_status(state="failed", error="boom", completed_rounds=2)
    run.write_status(state="running")
    assert "error" not in run.status()
    (tmp_path / "checkpoints" / "round_4").mkdir(parents=True)
    (tmp_path / "checkpoints" / "round_12").mkdir()
    (tmp_path / "checkpoints" / "round_13_temp0001").mkdir()
    rows = "".join(json.dumps({"round": r}) + "\n" for r in range(1, 14)) + '{"round": 14, "lo'
    # A damaged line, even one that is not UTF-8, is passed over like a cut one
    # (it was a refusal raised after the resume had begun writing).
    (tmp_path / "metrics.jsonl").write_bytes(b'{"round": 0, "x": "\xff"}\n' + rows.encode())
    run.note_stopped("interrupted")
    status = run.status()
    assert status["state"] == "interrupted" and "error" not in status
    assert (status["completed_rounds"], status["checkpoint_round"]) == (13, 12)


def test_status_is_updated_in_place_on_a_full_disk(tmp_path):
    with tmpfs(tmp_path / "fs", "64k") as fs:
        run = run_dir_lib.RunDirectory(fs)
        run.write_status(state="running", completed_rounds=1)
        fill(fs)
        with pytest.raises(OSError) as info:
            files.write_atomic(fs / "x", "y" * 10000)
        assert info.value.errno == errno.ENOSPC and info.value.filename == str(fs / "x")
        run.note_stopped("failed", error="cannot write metrics: no space")
        status = run.status()
        assert status["state"] == "failed" and status["error"].startswith("cannot write")
        assert not [p for p in fs.iterdir() if ".tmp-" in p.name]


def test_failures_of_tensorflow_file_writes_name_the_path():
    class ResourceExhaustedError(Exception):
        pass

    ResourceExhaustedError.__module__ = "tensorflow.python.framework.errors_impl"
    e = ResourceExhaustedError("/x/y_temp1234/variables; No space left on device\nmore")
    assert files.is_file_error(e)
    assert files.failure(e, "/x/y") == (
        "/x/y: No space left on device (free some space or choose another directory)"
    )
    assert not files.is_file_error(ValueError("No space left on device"))


SAVE_CHECKPOINT = """
import sys
import numpy as np
from pathlib import Path
from coordinator.run_dir import RunDirectory
from shared.errors import RunDirError
try:
    RunDirectory(Path(sys.argv[1])).save_checkpoint(3, [np.zeros(3, np.float32)])
except RunDirError as e:
    print(e)
"""


def test_a_checkpoint_write_refused_by_permissions_names_the_directory_that_failed(tmp_path):
    """It named the checkpoint's path twice, and not the staging directory
    TensorFlow could not make. Run in a user namespace of its own, where this
    test's root is no more than the owner of the files (0555: no writing)."""
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    checkpoints.chmod(0o555)
    result = subprocess.run(
        ["unshare", "--user", sys.executable, "-c", SAVE_CHECKPOINT, str(tmp_path / "run")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    line = result.stdout.strip()
    assert line.startswith(f"cannot write round 3's checkpoint: {checkpoints}/.staging.tmp-"), (
        result.stdout + result.stderr[-2000:]
    )
    assert line.endswith("Permission denied (check its permissions)")
    assert "round_3" not in line
    assert os.listdir(checkpoints) == []


# --- private directories of killed owners --------------------------------------------

MAKE_SCRATCH = """
from shared import scratch
print(scratch.make("testkind"), flush=True)
import time; time.sleep(600)
"""


def test_scratch_dirs_of_killed_owners_are_swept():
    from shared import scratch

    owner = subprocess.Popen(
        [sys.executable, "-c", MAKE_SCRATCH], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    left = Path(owner.stdout.readline().strip())
    assert left.is_dir() and left.parent == Path(tempfile.gettempdir())
    assert scratch.remove_abandoned("testkind") == []  # its owner lives
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait()
    time.sleep(0.1)
    mine = scratch.make("testkind")  # sweeps first
    try:
        assert not left.exists() and mine.is_dir()
        assert scratch.remove_abandoned("testkind") == []  # ours is held
    finally:
        scratch.release(mine)
    assert not mine.exists()


# --- commands' own bad input ----------------------------------------------------------


def test_tls_and_kits_dirs_that_are_files_are_called_so(tmp_path):
    """They were "no such directory" and "File exists" (exit 1)."""
    a_file = tmp_path / "kit"
    a_file.write_text("x")
    result = fedcompose("worker", "--shard", str(tmp_path), "--tls-dir", str(a_file), timeout=60)
    assert_one_line_error(result, "worker", 2, f"--tls-dir {a_file}: not a directory")
    result = fedcompose("provision", "--kits-dir", str(a_file), "--sites", "w0=127.0.0.1")
    assert_one_line_error(result, "provision", 2, f"--kits-dir {a_file} exists and is not a dir")


def test_worker_log_file_that_cannot_be_a_file(tmp_path, shards2):
    shard = str(shards2[0])
    for log_file, message in (
        (tmp_path, "Is a directory"),
        (Path("/proc/version"), "/proc/version: Invalid argument"),  # opens, cannot seek
        (tmp_path / "missing-parent-is-file" / "w.log", None),
    ):
        if message is None:
            (tmp_path / "missing-parent-is-file").write_text("x")
            message = "exists and is not a directory"
        result = fedcompose("worker", "--shard", shard, "--log-file", str(log_file), timeout=60)
        assert_one_line_error(result, "worker", 2, "log file", message)


def test_config_files_and_values_that_are_not_usable(tmp_path):
    not_utf8 = tmp_path / "latin1.toml"
    not_utf8.write_bytes("[training]\n# r\xe9glages\nrounds = 3\n".encode("latin-1"))
    non_finite = tmp_path / "inf.toml"
    non_finite.write_text("[training]\nclient_learning_rate = inf\n")
    cases = [
        (["--config", str(tmp_path)], "is a directory"),
        (["--config", str(not_utf8)], "is not UTF-8"),
        (["--config", str(tmp_path / "none.toml")], "does not exist"),
        (["--config", "/dev/zero"], "is larger than 1024 KiB"),  # read until memory ran out
        (["--config", str(non_finite)], "--client-learning-rate must be a finite number"),
        (["--client-learning-rate", "inf"], "must be a finite number"),
        (["--server-learning-rate=-inf"], "must be a finite number"),
        (["--clip-norm", "1e999"], "must be a finite number"),
        (["--rpc-timeout", "nan"], "must be a finite number"),
        (["--base-port", "65535", "--workers", "2"], "runs past port 65535"),
        (["--base-port=-1"], "--base-port must be >= 0"),
    ]
    for argv, message in cases:
        result = fedcompose("run", *argv, "--run-dir", str(tmp_path / "never"), timeout=60)
        assert_one_line_error(result, "run", 2, message)
    assert not (tmp_path / "never").exists()


def test_base_port_bounds_match_their_message():
    from tests.test_config import _resolve

    assert _resolve("--base-port", "65535", "--workers", "1").federation.base_port == 65535
    assert _resolve("--base-port", "80", "--workers", "1").federation.base_port == 80
    assert _resolve("--base-port", "65534", "--workers", "2").federation.base_port == 65534
    help_text = fedcompose("run", "--help").stdout
    assert "1024" not in help_text


def test_shards_dir_sets_the_worker_count(tmp_path, shards2):
    from deploy import local
    from tests.test_config import _resolve

    shards_dir = str(shards2[0].parent)
    config = _resolve("--shards-dir", shards_dir)
    assert local._shard_dirs(config, tmp_path, workers_given=False) == shards2
    assert config.federation.workers == 2  # what config.toml will record
    result = fedcompose("run", "--shards-dir", shards_dir, "--workers", "3", "--run-dir",
                        str(tmp_path / "r"))  # fmt: skip
    assert_one_line_error(result, "run", 2, "--workers 3 but --shards-dir", "holds 2 shards")


def test_status_of_a_run_whose_files_are_damaged(tmp_path):
    """A workers.json or status.json of another shape was a traceback in `status`."""
    address = "127.0.0.1:1"  # refused at once: nothing listens there
    entry = {"address": address, "state": "down", "since": "x", "reason": 1}
    views = [
        {"workers": 5, "updated_at": "yesterday"},
        {"workers": [entry, "address", {"address": 7}, {"address": address}]},
    ]
    for n, view in enumerate(views):
        run_dir = tmp_path / f"view{n}"
        run_dir.mkdir()
        (run_dir / "status.json").write_text('{"state": "running"}')
        (run_dir / "workers.json").write_text(json.dumps(view))
        result = fedcompose("status", "--run-dir", str(run_dir), "--addresses", address)
        assert result.returncode == 4, result.stderr  # the worker is down
        assert "Traceback" not in result.stderr and "DOWN" in result.stdout, result.stderr
        # status.json says running, but no coordinator holds the directory's lock.
        assert f"run {run_dir}: not running (it says running" in result.stdout, result.stdout
    (run_dir / "status.json").write_bytes(b'{"state": "runn')
    result = fedcompose("status", "--run-dir", str(run_dir))
    assert_one_line_error(result, "status", 5, str(run_dir / "status.json"), "cannot be read")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    result = fedcompose("status", "--run-dir", str(a_file))
    assert_one_line_error(result, "status", 2, str(a_file), "is not a directory")


def test_a_metrics_csv_that_cannot_be_read_is_rebuilt_from_the_jsonl(tmp_path):
    """A damaged metrics.csv let a resumed run train its first round and then
    end in a traceback (ValueError, UnicodeDecodeError) where TFF's CSV
    manager read it; it is rebuilt from metrics.jsonl at the start instead."""
    import asyncio

    import tensorflow_federated as tff

    rows = [{"round": r, "train": {"loss": 1.0 / r, "accuracy": 0.1 * r}} for r in (1, 2, 3)]
    rows[1]["eval"] = {"loss": 0.5, "accuracy": 0.9}
    damaged = {
        "bad round": b"round,train/loss\nx,1.0\n2,0.5\n",
        "not utf-8": b"\xff\xfe\x00r\x00o\x00u\x00n\x00d\x00\n",
        "no header": b"",
        "other file": b"name,value\nfoo,1\n",
        "rounds out of order": b"round,train/loss\n2,1.0\n1,0.5\n",
    }
    for case, content in damaged.items():
        run_dir = tmp_path / case.replace(" ", "-")
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run_dir / "metrics.csv").write_bytes(content)
        run = run_dir_lib.RunDirectory(run_dir)
        aside = run.repair_metrics_csv()
        assert aside == run_dir / "unreadable-metrics.csv", case
        assert aside.read_bytes() == content
        manager = tff.program.CSVFileReleaseManager(str(run.metrics_csv), key_fieldname="round")
        asyncio.run(manager.release({"train/loss": 0.25}, key=4))
        with open(run.metrics_csv, newline="") as f:
            table = list(csv.DictReader(f))
        assert [int(r["round"]) for r in table] == [1, 2, 3, 4], case
        assert table[1]["eval/accuracy"] == "0.9" and table[0]["train/loss"] == "1.0"
        assert run.repair_metrics_csv() is None  # readable now: left alone


def test_a_finished_run_whose_status_is_damaged_is_still_left_alone(tmp_path):
    """A finished run is not re-run; a status.json whose final figures were
    damaged made the summary line a traceback."""
    for n, final in enumerate(({"accuracy": "high"}, 5)):
        run_dir = tmp_path / f"run{n}"
        (run_dir / "checkpoints" / "round_3").mkdir(parents=True)
        (run_dir / "status.json").write_text(json.dumps({"state": "finished", "final_eval": final}))
        result = fedcompose(
            "train", "--addresses", "127.0.0.1:1", "--rounds", "3", "--run-dir", str(run_dir)
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert "Traceback" not in result.stderr and "already finished 3 rounds" in result.stderr
