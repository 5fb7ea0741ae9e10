"""Config file plus flags resolve as documented; bad values stop a run early."""

from __future__ import annotations

import argparse
import re
import tomllib

import pytest

from shared import config as config_lib
from shared.errors import UsageError
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
    parser = argparse.ArgumentParser()
    config_lib.add_arguments(parser, "run")
    return config_lib.resolve(parser.parse_args(list(argv)), "run")


def test_file_then_flags_then_defaults(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(CONFIG)
    config = _resolve("--config", str(path), "--rounds", "40", "--no-verbose")
    assert config.training.rounds == 40  # flag beats file
    assert config.training.clients_per_round == 5  # file beats default
    assert config.training.clip_norm == 2.0  # TOML int taken as float
    assert config.model.model == "cnn"
    assert config.federation.workers == 4
    assert config.output.verbose is False
    assert config.training.server_learning_rate == 1.0  # default
    assert config.evaluation.eval_every == 5


def test_resolved_config_round_trips_through_toml(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(CONFIG)
    config = _resolve("--config", str(path), "--seed", "7")
    written = tmp_path / "resolved.toml"
    written.write_text(config.to_toml())
    assert tomllib.loads(written.read_text()) == config.to_dict()
    again = _resolve("--config", str(written))
    assert again.to_dict() == config.to_dict()


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
        (["--client-learning-rate", "inf"], "--client-learning-rate must be a finite number"),
        (["--client-learning-rate", "nan"], "--client-learning-rate must be a finite number"),
        # Past `threading.TIMEOUT_MAX` a wait raises OverflowError mid-round.
        (["--round-timeout", "1e10"], "--round-timeout must be <= 1e"),
        (["--probe-interval", "1e10"], "--probe-interval must be <= 1e"),
        (["--probe-interval-max", "1e10"], "--probe-interval-max must be <= 1e"),
        (["--retry-wait", "1e10"], "--retry-wait must be <= 1e"),
        (["--rounds", "ten"], "--rounds takes an integer, got 'ten'"),
        (["--base-port", "65535", "--workers", "2"], "runs past port 65535"),
        (["--no-only-digits"], "--no-only-digits needs --source emnist"),
        (["--alpha", "0.3"], "--alpha applies to --partition dirichlet only"),
        (["--shards-dir", "x", "--writers", "30"], "--writers does not apply with --shards-dir"),
        # Huge values that went through and broke the run far from the flag: an
        # OverflowError in a wait, every worker "down" on an int64 shuffle seed,
        # an OverflowError building the client datasets.
        (["--round-timeout", "1e10"], "--round-timeout must be <= 1e+07"),
        (["--rpc-timeout", "1e300"], "--rpc-timeout must be <= 1e+07"),
        (["--connect-timeout", "1e10"], "--connect-timeout must be <= 1e+07"),
        (["--ready-timeout", "1e10"], "--ready-timeout must be <= 1e+07"),
        (["--retry-wait", "1e10"], "--retry-wait must be <= 1e+07"),
        (["--probe-interval", "1e10"], "--probe-interval must be <= 1e+07"),
        (["--probe-interval-max", "1e10"], "--probe-interval-max must be <= 1e+07"),
        (["--restart-backoff", "1e10"], "--restart-backoff must be <= 1e+07"),
        (["--seed", "10000000000000"], "--seed must be <= 4.29497e+09"),
        (["--batch-size", "99999999999999999999"], "--batch-size must be an integer below 2**63"),
        (["--rounds", str(2**63)], "--rounds must be an integer below 2**63"),
        (["--shuffle-buffer", str(2**62)], "--shuffle-buffer must be <= 100000"),
    ],
)
def test_invalid_values_are_rejected(argv, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        _resolve(*argv)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[model]\nmodel = "resnet"\n',
            "--model: unknown value 'resnet'; choose one of linear, cnn",
        ),
        ("[training]\nrounds = 'ten'\n", "--rounds must be an integer, got the text 'ten'"),
        # A number written as text was taken as the number.
        ('[training]\nrounds = "10"\n', "--rounds must be an integer, got the text '10'"),
        ('[training]\nclip_norm = "2.5"\n', "--clip-norm must be a number, got the text '2.5'"),
        # A key above every table was reported as a table.
        ("rounds = 5\n", "rounds is set outside any table; put it under [training]"),
        ("roundz = 5\n", "unknown setting roundz outside any table"),
        ("[training]\nround = 3\n", "unknown setting training.round"),
        ("[trainer]\nrounds = 3\n", "unknown table [trainer]"),
        ("[training\nrounds = 3\n", "is not valid TOML"),
    ],
)
def test_invalid_config_files_are_rejected(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("(", r"\(")):
        _resolve("--config", str(path))


def test_config_file_that_is_a_directory_or_not_text_is_one_line(tmp_path):
    with pytest.raises(UsageError, match="is a directory"):
        _resolve("--config", str(tmp_path))
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00rounds")
    with pytest.raises(UsageError, match="not UTF-8"):
        _resolve("--config", str(binary))


def test_one_flag_vocabulary_across_commands():
    """A setting's flag is the same in every command that takes it."""
    import argparse

    flags: dict[str, set[str]] = {}
    for name in config_lib.COMMANDS:
        parser = argparse.ArgumentParser()
        config_lib.add_arguments(parser, name)
        for action in parser._actions:
            if action.dest and "." in action.dest and action.option_strings:
                flags.setdefault(action.dest.split(".", 1)[1], set()).update(
                    o for o in action.option_strings if not o.startswith("--no-")
                )
    assert all(len(options) == 1 for options in flags.values()), flags
    assert flags["data_seed"] == {"--data-seed"} and flags["shards_dir"] == {"--shards-dir"}


def test_resume_sensitive_settings_come_from_their_declarations():
    config = _resolve()
    saved = config.to_dict()
    changed = _resolve("--client-learning-rate", "0.1", "--rounds", "50", "--eval-every", "2")
    assert config_lib.resume_conflicts(saved, changed) == [
        "training.client_learning_rate: 0.3 -> 0.1"
    ]


def test_command_line_rejects_before_starting_anything(tmp_path):
    run_dir = tmp_path / "run"
    result = fedcompose("run", "--clip-norm", "0", "--run-dir", str(run_dir), timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == "fedcompose run: error: --clip-norm must be > 0, got 0"
    assert not run_dir.exists()
    result = fedcompose("run", "--model", "resnet", timeout=60)
    assert result.returncode == 2 and "unknown value 'resnet'" in result.stderr
    result = fedcompose("run", "--config", str(tmp_path / "missing.toml"), timeout=60)
    assert result.returncode == 2 and "missing.toml does not exist" in result.stderr
    result = fedcompose("train", "--rounds", "3", timeout=60)
    assert result.returncode == 2 and "--addresses is required" in result.stderr


def test_every_command_has_help():
    for command in ("run", "worker", "train", "data", "status", "bench"):
        result = fedcompose(command, "--help", timeout=60)
        assert result.returncode == 0, (command, result.stderr)
        assert "usage: fedcompose" in result.stdout
    top = fedcompose("--help", timeout=60)
    assert top.returncode == 0 and "run" in top.stdout and "bench" in top.stdout
    run_help = fedcompose("run", "--help", timeout=60).stdout
    assert "(default: 30)" in run_help and "(default: 0.3)" in run_help


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[training]\nclient_learning_rate = nan\n",
            "training.client_learning_rate must be a finite",
        ),
        ("[training]\nserver_learning_rate = -1.0\n", "training.server_learning_rate must be > 0"),
        ('[model]\nmodel = "resnet"\n', "model.model: unknown value 'resnet'"),
        ("[training]\nclients_per_round = 0\n", "training.clients_per_round must be >= 1"),
        ("[federation]\nrpc_timeout = inf\n", "federation.rpc_timeout must be a finite"),
        ('[bench]\nsystems = ["keras"]\nhosted_clients = 0\n', "bench.hosted_clients must be >= 1"),
    ],
)
def test_every_table_of_a_config_file_is_checked_whatever_the_command(tmp_path, text, message):
    """`data --config` took nan and negative rates, an unknown model and
    clients_per_round = 0 in tables it does not use: the next command to use
    the same file found them (or not: the README says every non-finite number
    is refused)."""
    path = tmp_path / "shared.toml"
    path.write_text(text)
    for command in ("data", "worker", "status", "provision", "compare"):
        parser = argparse.ArgumentParser()
        config_lib.add_arguments(parser, command)
        required = {
            "data": ["--shards-dir", "x"],
            "worker": ["--shard", "x"],
            "provision": ["--kits-dir", "x"],
            "compare": ["a"],
        }.get(command, [])
        args = parser.parse_args(["--config", str(path), *required])
        with pytest.raises(UsageError, match=re.escape(message)):
            config_lib.resolve(args, command)


def test_a_sweep_of_another_command_in_a_config_file_is_checked_item_by_item(tmp_path):
    path = tmp_path / "shared.toml"
    path.write_text("[training]\nclients_per_round = [10, 100]\n")
    parser = argparse.ArgumentParser()
    config_lib.add_arguments(parser, "data")
    config_lib.resolve(parser.parse_args(["--config", str(path), "--shards-dir", "x"]), "data")
    # A list setting stays a list (the addresses of `train`, in a file `data` reads).
    path.write_text('[federation]\naddresses = ["127.0.0.1:1", "127.0.0.1:2"]\n')
    config = config_lib.resolve(
        parser.parse_args(["--config", str(path), "--shards-dir", "x"]), "data"
    )
    assert config.federation.addresses == ["127.0.0.1:1", "127.0.0.1:2"]
    path.write_text("[training]\nclients_per_round = [10, 0]\n")
    with pytest.raises(UsageError, match=re.escape("training.clients_per_round must be >= 1")):
        config_lib.resolve(parser.parse_args(["--config", str(path), "--shards-dir", "x"]), "data")


def test_data_with_a_bad_table_it_does_not_use_stops_before_building(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[training]\nclient_learning_rate = nan\n")
    shards = tmp_path / "shards"
    result = fedcompose("data", "--config", str(path), "--shards-dir", str(shards), timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"fedcompose data: error: config file {path}: training.client_learning_rate must be a "
        "finite number, got nan"
    )
    assert not shards.exists()
