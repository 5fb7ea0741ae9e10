"""Config file plus flags resolve as documented; bad values stop a run early."""

from __future__ import annotations

import tomllib

import pytest

from coordinator import config as config_lib
from deploy import local
from tests.conftest import fedcompose

CONFIG = """
[training]
rounds = 12
clients_per_round = 5
client_learning_rate = 0.1
clip_norm = 2

[model]
model = "cnn"

[federation]
workers = 4
"""


def _resolve(*argv: str) -> config_lib.RunConfig:
    return config_lib.resolve(local.build_parser().parse_args(list(argv)))


def test_file_then_flags_then_defaults(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(CONFIG)
    config = _resolve("--config", str(path), "--rounds", "40", "--no-only-digits")
    assert config.training.rounds == 40  # flag beats file
    assert config.training.clients_per_round == 5  # file beats default
    assert config.training.clip_norm == 2.0  # TOML int taken as float
    assert config.model.model == "cnn"
    assert config.federation.workers == 4
    assert config.data.only_digits is False
    assert config.training.server_learning_rate == 1.0  # default
    assert config.evaluation.eval_every == 5


def test_resolved_config_round_trips_through_toml(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(CONFIG)
    config = _resolve("--config", str(path), "--seed", "7")
    written = tmp_path / "resolved.toml"
    written.write_text(config.to_toml())
    assert tomllib.loads(written.read_text()) == config.to_dict()
    assert _resolve("--config", str(written)) == config


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--client-learning-rate", "-0.1"], "--client-learning-rate must be > 0"),
        (["--server-learning-rate", "0"], "--server-learning-rate must be > 0"),
        (["--clip-norm", "0"], "--clip-norm must be > 0"),
        (["--clip-norm", "-1"], "--clip-norm must be > 0"),
        (["--rounds", "0"], "--rounds must be >= 1"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--workers", "0"], "--workers must be >= 1"),
        (["--clients-per-round", "61"], "more than the 60 writers of the default data"),
        (["--alpha", "0"], "--alpha must be > 0"),
        (["--eval-every", "-1"], "--eval-every must be >= 0"),
    ],
)
def test_invalid_values_are_rejected(argv, message):
    with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(")):
        _resolve(*argv)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[model]\nmodel = "resnet"\n',
            "--model: unknown value 'resnet'; choose one of linear, cnn",
        ),
        ("[training]\nrounds = 'ten'\n", "training.rounds must be a int, got 'ten'"),
        ("[training]\nround = 3\n", "unknown setting training.round"),
        ("[trainer]\nrounds = 3\n", "unknown table [trainer]"),
        ("[training\nrounds = 3\n", "is not valid TOML"),
    ],
)
def test_invalid_config_files_are_rejected(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(
        config_lib.ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")
    ):
        _resolve("--config", str(path))


def test_command_line_rejects_before_starting_anything(tmp_path):
    run_dir = tmp_path / "run"
    result = fedcompose("run", "--clip-norm", "0", "--run-dir", str(run_dir), timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "fedcompose run: error: --clip-norm must be > 0"
    assert not run_dir.exists()
    result = fedcompose("run", "--model", "resnet", timeout=60)
    assert result.returncode == 2 and "invalid choice: 'resnet'" in result.stderr
    result = fedcompose("run", "--config", str(tmp_path / "missing.toml"), timeout=60)
    assert result.returncode == 2 and "missing.toml does not exist" in result.stderr
    result = fedcompose("train", "--rounds", "3", timeout=60)
    assert result.returncode == 2 and "no workers given; pass --addresses" in result.stderr


def test_every_command_has_help():
    for command in ("run", "worker", "train", "data", "status", "bench"):
        result = fedcompose(command, "--help", timeout=60)
        assert result.returncode == 0, (command, result.stderr)
        assert "usage: fedcompose" in result.stdout
    top = fedcompose("--help", timeout=60)
    assert top.returncode == 0 and "run" in top.stdout and "bench" in top.stdout
    run_help = fedcompose("run", "--help", timeout=60).stdout
    assert "(default: 30)" in run_help and "(default: 0.3)" in run_help
