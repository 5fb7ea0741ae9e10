"""The Python API: a user's own learning process across real worker processes.

Each process is the kind a researcher writes in a notebook (tests/user_algorithms/):
the seed tutorial's code, a user-written aggregator, a user's Keras model and
preprocessing, TFF's federated k-means. Each is trained across two real
workers and compared with the same process in TFF's own single-process
context on the same clients (`run_in_tff`): the final weights must agree
within 1e-5. All of them run in one federation, one after another, as a
sweep does: the workers are the same processes throughout.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil
import pytest

from tests.conftest import ROOT

ATOL = 1e-5


def _max_diff(a, b) -> float:
    return max(
        float(np.abs(np.asarray(x) - np.asarray(y)).max())
        for x, y in zip(a.trainable, b.trainable, strict=True)
    )


def _pids(federation) -> set[int]:
    return {w.process.pid for w in federation._workers.started}


@pytest.mark.slow
def test_user_processes_run_across_workers_and_equal_tff_single_process(tmp_path):
    import fedcompose
    from tests.user_algorithms import custom, tutorial

    spec = tutorial.preprocess(fedcompose.empty_client_dataset()).element_spec
    model_fn = tutorial.model_fn_for(spec)
    mlp_spec = custom.pooled_preprocess(fedcompose.empty_client_dataset()).element_spec
    cases = {
        "tutorial": dict(
            process=tutorial.compose(model_fn),
            preprocess=tutorial.preprocess,
            model_fn=model_fn,
        ),
        "user_aggregator": dict(
            process=tutorial.compose(model_fn, custom.CoordinateClippedMean()),
            preprocess=tutorial.preprocess,
            model_fn=model_fn,
        ),
        "user_model_and_preprocessing": dict(
            process=tutorial.compose(custom.mlp_model_fn_for(mlp_spec), client_learning_rate=0.1),
            preprocess=custom.pooled_preprocess,
            model_fn=custom.mlp_model_fn_for(mlp_spec),
        ),
        "fed_kmeans": dict(process=custom.kmeans_process(), preprocess=custom.kmeans_preprocess),
    }
    rounds, clients = 3, 12
    results, references = {}, {}
    with fedcompose.LocalFederation(workers=2, progress=False) as federation:
        pids = _pids(federation)
        for name, case in cases.items():
            results[name] = federation.train(
                **case,
                rounds=rounds,
                clients_per_round=clients,
                seed=3,
                eval_every=1,
                run_dir=tmp_path / name,
            )
            references[name] = federation.run_in_tff(
                case["process"],
                preprocess=case["preprocess"],
                rounds=rounds,
                clients_per_round=clients,
                seed=3,
            )
        # One federation served every training: no worker was restarted.
        assert _pids(federation) == pids
        shard_dirs = list(federation.shard_dirs)
    for name in cases:
        diff = _max_diff(results[name].model_weights, references[name].model_weights)
        print(f"{name}: max |distributed - TFF single process| {diff:.2e}")
        assert diff <= ATOL, (name, diff)

    tutorial_run = results["tutorial"]
    history = tutorial_run.history
    assert list(history.index) == [1, 2, 3]
    # A round really lowers the held-out loss, and the records say so.
    assert history["eval_loss"].iloc[-1] < history["eval_loss"].iloc[0]
    assert (tutorial_run.run_dir / "metrics.csv").exists()
    assert (tutorial_run.run_dir / "final_model.npz").exists()
    assert json.loads((tutorial_run.run_dir / "algorithm.json").read_text())["kind"] == "user"
    # The blocks differ, so each comparison tests its own block.
    assert _max_diff(results["user_aggregator"].model_weights, tutorial_run.model_weights) > 1e-4
    # k-means has no model to evaluate: trained and recorded, not evaluated.
    assert results["fed_kmeans"].final_eval is None
    kmeans_history = results["fed_kmeans"].history
    assert any(c.startswith("measurements/") for c in kmeans_history.columns)
    # The data stayed on the workers: the run directory holds no shard.
    for result in results.values():
        assert not list(result.run_dir.rglob("*.bin"))
    assert all(d.exists() is False for d in shard_dirs)  # the temporary shards are gone


@pytest.mark.slow
def test_what_cannot_run_is_refused_in_one_line_before_round_1(tmp_path):
    import fedcompose
    from shared.errors import TrainingError, UsageError
    from tests.user_algorithms import custom, tutorial

    spec = tutorial.preprocess(fedcompose.empty_client_dataset()).element_spec
    model_fn = tutorial.model_fn_for(spec)
    mlp_spec = custom.pooled_preprocess(fedcompose.empty_client_dataset()).element_spec
    refusals = {
        # The model takes 196 pooled pixels; the tutorial's preprocessing makes 784.
        "mismatch": (
            dict(
                process=tutorial.compose(custom.mlp_model_fn_for(mlp_spec)),
                preprocess=tutorial.preprocess,
            ),
            ["takes elements", "784", "196"],
        ),
        "secure_sum": (
            dict(process=custom.secure_sum_process(model_fn), preprocess=tutorial.preprocess),
            ["cannot be split across workers"],
        ),
        "not_a_learning_process": (
            dict(process=custom.non_learning_process(), preprocess=tutorial.preprocess),
            ["not a tff.learning.templates.LearningProcess"],
        ),
        "preprocessing_that_does_not_trace": (
            dict(
                process=tutorial.compose(model_fn),
                preprocess=lambda ds: ds.map(lambda e: e["no_such_feature"]),
            ),
            ["preprocessing function cannot run", "no_such_feature"],
        ),
    }
    with fedcompose.LocalFederation(workers=1, writers=12, progress=False) as federation:
        for name, (case, words) in refusals.items():
            run_dir = tmp_path / name
            with pytest.raises(UsageError) as refused:
                federation.train(**case, rounds=2, clients_per_round=4, run_dir=run_dir)
            message = str(refused.value)
            print(f"{name}: {message}")
            assert "\n" not in message, name
            for word in words:
                assert word in message, (name, word)
            assert not (run_dir / "metrics.jsonl").exists(), name
            assert not (run_dir / "config.toml").exists(), name

        # A process whose update is not finite stops the run in one line
        # naming the clients, found with the user's model at the round's start.
        def poisoned(dataset):
            return tutorial.preprocess(dataset).map(lambda x, y: (x * np.float32("nan"), y))

        with pytest.raises(TrainingError) as not_finite:
            federation.train(
                tutorial.compose(model_fn),
                preprocess=poisoned,
                model_fn=model_fn,
                rounds=2,
                clients_per_round=4,
                run_dir=tmp_path / "nan",
            )
        message = str(not_finite.value)
        print(f"non-finite: {message}")
        assert "\n" not in message
        assert "round 1: the aggregated update was not finite" in message
        assert "training loss at the round's starting model is not finite for" in message
        # The federation is still good for a training after all of them.
        ok = federation.train(
            tutorial.compose(model_fn),
            preprocess=tutorial.preprocess,
            rounds=1,
            clients_per_round=4,
            run_dir=tmp_path / "ok",
        )
        assert ok.rounds_completed == 1
        # Resuming a run directory with another process is refused too.
        with pytest.raises(Exception) as other:
            federation.train(
                tutorial.compose(model_fn, custom.CoordinateClippedMean()),
                preprocess=tutorial.preprocess,
                rounds=2,
                clients_per_round=4,
                run_dir=tmp_path / "ok",
            )
        assert "another learning process" in str(other.value)
        # A finished run directory asked for by another process of the same types
        # (named otherwise) is refused too, not returned as finished.
        with pytest.raises(Exception) as renamed:
            federation.train(
                tutorial.compose(model_fn),
                preprocess=tutorial.preprocess,
                name="another learning rate",
                rounds=1,
                clients_per_round=4,
                run_dir=tmp_path / "ok",
            )
        assert "another learning process" in str(renamed.value)
        again = federation.train(
            tutorial.compose(model_fn),
            preprocess=tutorial.preprocess,
            rounds=1,
            clients_per_round=4,
            run_dir=tmp_path / "ok",
        )
        assert again.already_finished and "nothing was run" in repr(again)
        # More rounds of the same process resume after its checkpoint.
        more = federation.train(
            tutorial.compose(model_fn),
            preprocess=tutorial.preprocess,
            rounds=2,
            clients_per_round=4,
            run_dir=tmp_path / "ok",
        )
        assert (more.resumed_from, more.rounds_completed) == (1, 2)
        assert [r["round"] for r in more.records] == [1, 2]


def test_settings_are_checked_like_the_command_line_before_anything_starts(tmp_path):
    from coordinator import api
    from deploy.local_federation import LocalFederation
    from shared.errors import UsageError

    fixed = {"addresses": ["127.0.0.1:1"]}

    def train_settings(**values):
        return api.resolve_settings(
            "train",
            api.TRAIN_SECTIONS,
            values,
            fixed=fixed,
            what="train()",
            exclude=api.FEDERATION_OWNED,
        )

    config = train_settings(rounds=7, clients_per_round=3, eval_every=2, seed=5)
    assert (config.training.rounds, config.training.clients_per_round) == (7, 3)
    assert (config.evaluation.eval_every, config.training.seed) == (2, 5)
    for values, words in [
        ({"rounds": 0}, "--rounds must be >= 1"),
        ({"client_learning_rate": float("nan")}, "must be a finite number"),
        ({"aggregator": "median"}, "unknown value 'median'"),
        ({"rounds": "ten"}, "--rounds"),
    ]:
        with pytest.raises(UsageError, match=words):
            train_settings(**values)
    with pytest.raises(TypeError, match=r"unexpected setting.*rounnds"):
        train_settings(rounnds=3)
    with pytest.raises(TypeError, match="workers is a setting of the federation"):
        train_settings(workers=3)
    with pytest.raises(TypeError, match="round_timeout is a setting of train"):
        LocalFederation(workers=2, round_timeout=3)
    with pytest.raises(UsageError, match="--workers must be"):
        LocalFederation(workers=0)
    # A sweep over numpy's numbers (np.linspace) takes them as Python's.
    swept = train_settings(rounds=np.int64(3), client_learning_rate=np.float64(0.05))
    assert (swept.training.rounds, swept.training.client_learning_rate) == (3, 0.05)
    config_file = tmp_path / "sweep.toml"
    config_file.write_text("[training]\nrounds = 4\n")
    assert (
        api.resolve_settings(
            "train", api.TRAIN_SECTIONS, {}, config_file, fixed=fixed, exclude=api.FEDERATION_OWNED
        ).training.rounds
        == 4
    )


def test_what_is_not_a_process_model_or_dataset_is_one_line(tmp_path):
    import tensorflow as tf

    from coordinator.algorithm import user_process
    from coordinator.api import RemoteFederation
    from deploy.local_federation import LocalFederation
    from shared.errors import UsageError
    from tests.user_algorithms import tutorial

    with pytest.raises(UsageError, match=r"must return a tf\.data\.Dataset"):
        user_process.traced(lambda ds: tf.constant(1.0), "train")
    with pytest.raises(UsageError, match="must be a function"):
        user_process.traced("not a function", "train")
    with pytest.raises(UsageError, match="returned Sequential"):
        user_process._model_input_type(tutorial.create_keras_model)

    def broken():
        raise ValueError("my model is broken")

    with pytest.raises(UsageError, match="model_fn\\(\\) failed: ValueError: my model is broken"):
        user_process._model_input_type(broken)
    assert RemoteFederation("127.0.0.1:1, 127.0.0.1:2").config.federation.addresses == [
        "127.0.0.1:1",
        "127.0.0.1:2",
    ]
    with pytest.raises(TypeError, match="list of 'host:port' strings"):
        RemoteFederation(None)  # type: ignore[arg-type]  # what a user may pass
    with pytest.raises(UsageError, match="call it inside the `with` block"):
        LocalFederation(workers=1).run_in_tff(None, preprocess=None)
    with pytest.raises(UsageError, match="does not exist; build shards there"):
        LocalFederation(shards_dir=tmp_path / "no-such-shards").start()
    with pytest.raises(UsageError, match="is a file"):
        (tmp_path / "file").write_text("")
        LocalFederation(workers=1, work_dir=tmp_path / "file").start()


def test_train_before_start_says_what_to_do():
    from coordinator.api import RemoteFederation
    from shared.errors import UsageError

    federation = RemoteFederation(["127.0.0.1:1"])
    with pytest.raises(UsageError, match="not running: use it in a `with` block"):
        federation.train(rounds=1)


def test_an_unreachable_worker_is_one_error_and_nothing_left(tmp_path):
    from coordinator.api import RemoteFederation
    from shared import ports
    from shared.errors import FedcomposeError

    port = ports.free_ports(1)[0]
    with (
        pytest.raises(FedcomposeError) as failed,
        RemoteFederation([f"127.0.0.1:{port}"], connect_timeout=2.0, progress=False),
    ):
        pass
    assert "\n" not in str(failed.value)
    assert str(port) in str(failed.value)


def _child_federation(script: str, tmp_path) -> subprocess.Popen:
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(script))
    return subprocess.Popen(
        [sys.executable, str(path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _wait_for_line(proc: subprocess.Popen, marker: str, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if marker in line:
            return line
        if not line and proc.poll() is not None:
            raise AssertionError(f"child exited {proc.returncode}: {proc.stderr.read()[-3000:]}")
    raise AssertionError(f"no {marker!r} within {timeout}s")


def _gone(pids: list[int], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(psutil.pid_exists(p) and _alive(p) for p in pids):
            return True
        time.sleep(0.2)
    return False


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["exception", "keyboard_interrupt", "sigkill"])
def test_every_worker_stops_however_the_owner_ends(tmp_path, ending):
    """On an exception or KeyboardInterrupt in the `with` block (a notebook
    cell interrupted), the federation stops its workers; when its process is
    killed outright (a notebook kernel restarted), they stop by themselves."""
    proc = _child_federation(
        f"""
        import json, os, time
        import fedcompose
        federation = fedcompose.LocalFederation(workers=2, writers=8, progress=False)
        try:
            with federation:
                pids = [w.process.pid for w in federation._workers.started]
                print("WORKERS", json.dumps(pids), flush=True)
                if {ending!r} == "exception":
                    raise RuntimeError("the user's cell failed")
                if {ending!r} == "keyboard_interrupt":
                    raise KeyboardInterrupt
                time.sleep(600)
        except (RuntimeError, KeyboardInterrupt):
            print("STOPPED", flush=True)
        """,
        tmp_path,
    )
    try:
        pids = json.loads(_wait_for_line(proc, "WORKERS").split(" ", 1)[1])
        workers = [c.pid for p in pids for c in _descendants(p)] + pids
        if ending == "sigkill":
            proc.send_signal(signal.SIGKILL)
        else:
            _wait_for_line(proc, "STOPPED")
        assert _gone(workers), [p for p in workers if _alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


@pytest.mark.slow
def test_a_user_process_rides_out_a_lost_worker_which_rejoins(tmp_path, monkeypatch):
    """A worker's executor killed as round 3 is dispatched: the round goes on
    without its clients (degraded), the supervisor restarts the worker, and it
    serves again in later rounds, as with fedcompose's own algorithm."""
    import threading

    import fedcompose
    from tests.user_algorithms import tutorial

    pause, back = tmp_path / "pause", tmp_path / "back"
    monkeypatch.setenv("FEDCOMPOSE_PAUSE_AT", f"dispatch:3={pause};dispatch:6={back}")
    spec = tutorial.preprocess(fedcompose.empty_client_dataset()).element_spec
    model_fn = tutorial.model_fn_for(spec)
    killed: list[int] = []

    def kill_at_dispatch(federation) -> None:
        deadline = time.monotonic() + 600
        while not pause.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        sent_to = json.loads(pause.read_text())["workers"]
        victim = next(w for w in federation._workers.started if w.address in sent_to)
        executor = next(
            c for c in _descendants(victim.process.pid) if "worker_binary" in " ".join(c.cmdline())
        )
        executor.kill()
        killed.append(victim.index)
        pause.unlink()
        # The loop is held at round 6 until the restarted worker is warmed up
        # (off the round path): it then serves from round 6 on.
        while not back.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
                view = json.loads((tmp_path / "run" / "workers.json").read_text())
                entry = view["workers"][victim.index]
                if entry["state"] == "up" or "warmed up" in entry["reason"]:
                    break
            time.sleep(0.1)
        back.unlink()

    with fedcompose.LocalFederation(
        workers=3, worker_restarts=2, restart_backoff=0.5, progress=False
    ) as federation:
        killer = threading.Thread(target=kill_at_dispatch, args=(federation,), daemon=True)
        killer.start()
        result = federation.train(
            tutorial.compose(model_fn),
            preprocess=tutorial.preprocess,
            model_fn=model_fn,
            rounds=14,
            clients_per_round=12,
            eval_every=0,
            retry_wait=2.0,
            run_dir=tmp_path / "run",
        )
        killer.join(timeout=60)
    rows = result.records
    assert [r["round"] for r in rows] == list(range(1, 15))
    label = f"worker{killed[0]}"
    assert rows[2]["degraded"] == 1 and label in rows[2]["workers_lost"], rows[2]
    assert rows[2]["clients_lost"] > 0
    assert any(label in r["workers"] for r in rows[3:]), "the worker never served again"
    assert result.final_eval is not None and result.final_eval["examples"] == 360


@pytest.mark.slow
def test_a_remote_federation_trains_a_user_process_over_mutual_tls(shards2, tmp_path):
    """Workers on two other network hosts, serving mutual TLS with kits from
    `fedcompose provision`; the API dials them with the coordinator's kit."""
    import fedcompose
    from deploy import provision
    from deploy import workers as workers_lib
    from tests import netns
    from tests.user_algorithms import tutorial

    spec = tutorial.preprocess(fedcompose.empty_client_dataset()).element_spec
    model_fn = tutorial.model_fn_for(spec)
    with netns.linked_hosts(2, block=5) as hosts:
        kits = tmp_path / "kits"
        provision.provision(
            kits, provision.parse_sites([f"w{i}={h.address}" for i, h in enumerate(hosts)])
        )
        started = workers_lib.start_workers(
            shards2,
            tmp_path / "logs",
            check="quick",
            prefix=lambda i: hosts[i].prefix(),
            extra_args=lambda i: ["--tls-dir", str(kits / f"w{i}")],
        )
        try:
            addresses = [f"{h.address}:{w.port}" for h, w in zip(hosts, started, strict=True)]
            with fedcompose.RemoteFederation(
                addresses, tls_dir=kits / "coordinator", progress=False
            ) as federation:
                assert federation.num_clients == 60
                result = federation.train(
                    tutorial.compose(model_fn),
                    preprocess=tutorial.preprocess,
                    model_fn=model_fn,
                    rounds=2,
                    clients_per_round=10,
                    run_dir=tmp_path / "run",
                )
            # Without the kit, the same workers are not reachable.
            with (
                pytest.raises(fedcompose.FedcomposeError),
                fedcompose.RemoteFederation(addresses, connect_timeout=5.0, progress=False),
            ):
                pass
        finally:
            workers_lib.stop_workers(started)
    assert result.rounds_completed == 2
    assert result.final_eval is not None and result.final_eval["examples"] == 360
    assert len(result.records[-1]["workers"]) == 2
