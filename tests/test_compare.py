"""`fedcompose compare`: one picture and one table for several run directories."""

from __future__ import annotations

import json
from pathlib import Path

from shared import config as config_lib
from tests.conftest import fedcompose


def _fake_run(path: Path, accuracies: list[float], **algorithm) -> Path:
    """A run directory as `fedcompose run` leaves it (metrics.jsonl, config.toml, status)."""
    path.mkdir(parents=True)
    config = config_lib.RunConfig()
    for key, value in algorithm.items():
        setattr(config.algorithm, key, value)
    (path / "config.toml").write_text(config.to_toml())
    rows = []
    for i, acc in enumerate(accuracies, start=1):
        row = {"round": i, "train": {"loss": 1.0, "accuracy": acc}}
        if i % 2 == 0:
            row["eval"] = {"loss": 2.0 - acc, "accuracy": acc, "examples": 360}
        if algorithm.get("aggregator", "").startswith("dp_"):
            row["privacy"] = {"epsilon": 10.0 * i, "delta": 1e-5, "noise_multiplier": 0.5}
        rows.append(row)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "status.json").write_text(json.dumps({"state": "finished"}))
    return path


def test_compare_draws_one_picture_and_prints_final_figures(tmp_path):
    a = _fake_run(tmp_path / "fedavg", [0.2, 0.5, 0.7, 0.8])
    b = _fake_run(tmp_path / "fedadam", [0.3, 0.9, 0.6, 0.85], server_optimizer="adam")
    c = _fake_run(tmp_path / "dp", [0.1, 0.2, 0.3, 0.4], aggregator="dp_fixed")
    out = tmp_path / "cmp.png"
    result = fedcompose("compare", str(a), str(b), str(c), "--output", str(out), timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 10_000
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["run", "algorithm", "rounds", "held-out"]
    fedavg, fedadam, dp = lines[2:5]
    assert fedavg.startswith("fedavg") and "0.8000" in fedavg and "server sgd 1" in fedavg
    assert "0.8500" in fedadam and "0.9000" in fedadam and "server adam" in fedadam  # final, best
    assert "dp_fixed z=0.5" in dp and "40 (d=1e-05)" in dp


def test_compare_refuses_what_is_not_a_finished_run_in_one_line(tmp_path):
    good = _fake_run(tmp_path / "good", [0.1, 0.2])
    cases = [
        ([str(tmp_path / "missing")], "is not a run directory", 5),
        ([str(tmp_path)], "holds no metrics.jsonl", 5),
        ([str(good), str(good)], "listed twice", 2),
        ([str(good), "--output", str(tmp_path / "x.jpg")], "give a .png file", 2),
        ([], "give at least one RUN_DIR", 2),
    ]
    empty = tmp_path / "no-eval"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text(json.dumps({"round": 1, "train": {}}) + "\n")
    cases.append(([str(empty)], "has no held-out evaluation yet", 5))
    for args, message, code in cases:
        result = fedcompose("compare", *args, timeout=120)
        assert result.returncode == code, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert message in result.stderr, (args, result.stderr)


def test_compare_survives_damaged_files_and_notes_runs_that_end_apart(tmp_path):
    a = _fake_run(tmp_path / "a", [0.2, 0.5, 0.7, 0.8])
    b = _fake_run(tmp_path / "b", [0.3, 0.6])  # still running, say: evaluated at round 2
    # Rows a run never writes (an edited or damaged file) and a hand-edited config.
    with open(b / "metrics.jsonl", "a") as f:
        for row in ([1], {"round": "x", "eval": {"loss": 1.0, "accuracy": 0.5}},
                    {"round": 3, "eval": {"loss": 1.0}}, {"round": 3, "eval": None}):  # fmt: skip
            f.write(json.dumps(row) + "\n")
    (b / "config.toml").write_text('[algorithm]\nproximal_mu = "x"\n[training]\n')
    out = tmp_path / "cmp.png"
    result = fedcompose("compare", str(a), str(b), "--output", str(out), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "the final figures are from different rounds (a 4, b 2)" in result.stderr
    assert "prox x" in result.stdout

    # Two runs of one name in different places are told apart by their paths.
    other = _fake_run(tmp_path / "elsewhere" / "a", [0.1, 0.2, 0.3, 0.4])
    both = fedcompose("compare", str(a), str(other), "--output", str(out), timeout=120)
    assert both.returncode == 0, both.stderr
    rows = [line.split()[0] for line in both.stdout.splitlines()[2:]]
    assert rows == [str(a), str(other)], both.stdout

    # A run without a readable config.toml is not guessed to be the default.
    (other / "config.toml").unlink()
    guessed = fedcompose("compare", str(other), "--output", str(out), timeout=120)
    assert "? (no readable config.toml)" in guessed.stdout, guessed.stdout

    # The same directory spelled twice, and a file given as a run directory.
    twice = fedcompose("compare", str(a), f"{a}/", "--output", str(out), timeout=120)
    assert twice.returncode == 2 and "listed twice" in twice.stderr, twice.stderr
    not_dir = fedcompose("compare", str(a / "metrics.jsonl"), timeout=120)
    assert not_dir.returncode == 5 and "(not a directory)" in not_dir.stderr, not_dir.stderr


def test_compare_passes_over_damaged_rows_and_settings(tmp_path):
    """Rows and settings of another shape (a damaged or hand-edited file) were
    tracebacks; they are passed over, and a run left with none is refused."""
    run = _fake_run(tmp_path / "damaged", [0.1, 0.5, 0.6, 0.7])
    junk = [
        "[1, 2]",
        '"text"',
        '{"round": "3", "eval": {"accuracy": 0.9, "loss": 1.0}}',
        '{"round": 5, "eval": 0.9}',
        '{"round": 6, "eval": {"accuracy": null, "loss": 1.0}}',
        '{"round": 7, "privacy": 3}',
    ]
    with open(run / "metrics.jsonl", "a") as f:
        f.write("\n".join(junk) + "\n")
    (run / "config.toml").write_text(
        'data = "x"\n[algorithm]\naggregator = 5\nproximal_mu = "a"\n'
        '[training]\nserver_learning_rate = "fast"\n'
    )
    (run / "status.json").write_text("[]")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    only_junk = tmp_path / "junk"
    only_junk.mkdir()
    (only_junk / "metrics.jsonl").write_text("\n".join(junk) + "\n")
    result = fedcompose("compare", str(run), "--output", str(tmp_path / "c.png"), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "0.7000" in result.stdout.splitlines()[2]
    for path, message in ((not_a_dir, "(not a directory)"), (only_junk, "no held-out evaluation")):
        result = fedcompose("compare", str(path), timeout=120)
        assert result.returncode == 5, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
