"""The [algorithm] settings: declared once, checked before anything starts, mapped to blocks."""

from __future__ import annotations

import argparse
import dataclasses
import math
import tomllib

import pytest

from shared import config as config_lib
from shared.errors import UsageError
from tests.conftest import fedcompose


def _resolve(*argv: str, command: str = "run") -> config_lib.RunConfig:
    parser = argparse.ArgumentParser()
    config_lib.add_arguments(parser, command)
    return config_lib.resolve(parser.parse_args(list(argv)), command)


FLOAT_SETTINGS = [
    f.name
    for cls in (config_lib.AlgorithmConfig, config_lib.TrainingConfig)
    for f in dataclasses.fields(cls)
    if isinstance(f.default, float)
]


@pytest.mark.parametrize("name", FLOAT_SETTINGS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_every_float_setting_rejects_non_finite_values(name, value):
    flag = "--" + name.replace("_", "-")
    with pytest.raises(UsageError, match=f"{flag} must be a finite number"):
        _resolve(f"{flag}={value}")


def test_non_finite_values_in_a_config_file_are_rejected_too(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[algorithm]\nserver_epsilon = inf\n")
    with pytest.raises(UsageError, match="--server-epsilon must be a finite number"):
        _resolve("--config", str(path))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--aggregator", "secure"], "cannot be split into the mergeable form"),
        (["--aggregator", "krum"], "unknown value 'krum'"),
        (["--server-optimizer", "adam", "--server-beta-1", "1"], "--server-beta-1 must be < 1"),
        (["--client-optimizer", "sgdm", "--client-momentum", "1.0"], "must be < 1"),
        (["--quantization-bits", "17", "--aggregator", "compression"], "must be <= 16"),
        (["--noise-multiplier", "-1", "--aggregator", "dp_fixed"], "must be >= 0"),
        (["--dp-clip-norm", "0", "--aggregator", "dp_fixed"], "must be > 0"),
        (["--proximal-mu", "-0.1"], "--proximal-mu must be >= 0"),
        (["--dp-delta", "1", "--aggregator", "dp_fixed"], "--dp-delta must be < 1"),
        (["--server-beta-1", "0.5"], "--server-beta-1 applies to --server-optimizer adam / yogi"),
        (["--client-momentum", "0.5"], "--client-momentum applies to --client-optimizer sgdm"),
        (["--noise-multiplier", "1.0"], "--noise-multiplier applies to --aggregator dp_fixed"),
        (["--aggregator", "dp_fixed", "--clipping-norm", "2"], "applies to --aggregator robust"),
        (
            ["--aggregator", "dp_fixed", "--weighting", "uniform", "--quantization-bits", "4"],
            "only",
        ),
        (
            ["--client-work", "model_delta", "--clip-norm", "2"],
            "--clip-norm applies to --client-work clipped",
        ),
        (
            ["--aggregator", "robust", "--no-zeroing", "--zeroing-norm", "3"],
            "--zeroing-norm needs --zeroing",
        ),
        (
            ["--aggregator", "dp_adaptive", "--noise-multiplier", "1.0"],
            "needs more than 10 clients per round",
        ),
        (["--on-non-finite", "ignore"], "choose one of fail, drop"),
        (
            ["--aggregator", "dp_fixed", "--sampling", "stratified"],
            "privacy accounting covers uniform sampling only",
        ),
        (["--sampling", "random"], "choose one of uniform, stratified"),
        # A flag the chosen block does not take is refused even at its default value.
        (["--noise-multiplier", "0.5"], "--noise-multiplier applies to --aggregator dp_fixed"),
        (["--aggregator", "dp_fixed", "--weighting", "examples"], "--weighting applies to"),
        (["--server-momentum", "0.9"], "--server-momentum applies to --server-optimizer sgdm"),
        (["--client-work", "model_delta", "--clip-norm", "1"], "--clip-norm applies to"),
    ],
)
def test_invalid_algorithms_are_refused_in_one_line(argv, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")) as info:
        _resolve(*argv)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("quantization_bits = 2.5", "--quantization-bits must be an integer, got 2.5"),
        ("quantization_bits = true", "--quantization-bits must be an integer, got True"),
        ("noise_multiplier = true", "--noise-multiplier must be a number, got True"),
        ("aggregator = 3", "--aggregator must be text (a string), got 3"),
    ],
)
def test_a_config_file_value_of_the_wrong_type_is_named_in_plain_words(tmp_path, line, message):
    path = tmp_path / "c.toml"
    path.write_text(f"[algorithm]\n{line}\n")
    with pytest.raises(UsageError) as info:
        _resolve("--config", str(path))
    assert str(info.value) == message


def test_a_resolved_config_fed_back_may_change_its_blocks(tmp_path):
    """A resolved config.toml holds every setting at its value, those of the
    blocks not chosen included: with --config, only values other than the
    defaults count as set, so another aggregator can be chosen by flag."""
    written = tmp_path / "config.toml"
    written.write_text(_resolve().to_toml())  # mean, weighting = "examples", ...
    config = _resolve("--config", str(written), "--aggregator", "dp_fixed")
    assert (config.algorithm.aggregator, config.algorithm.weighting) == ("dp_fixed", "uniform")
    # DP's own weighting, given by flag, is accepted.
    assert _resolve("--aggregator", "dp_fixed", "--weighting", "uniform").algorithm.weighting == (
        "uniform"
    )


def test_the_blocks_are_recorded_and_read_back(tmp_path):
    config = _resolve(
        "--aggregator",
        "dp_adaptive",
        "--noise-multiplier",
        "0.5",
        "--server-optimizer",
        "adam",
        "--server-learning-rate",
        "0.03",
        "--client-work",
        "model_delta",
        "--proximal-mu",
        "0.1",
    )
    # DP aggregators are unweighted, and the resolved config says so.
    assert config.algorithm.weighting == "uniform"
    written = tmp_path / "config.toml"
    written.write_text(config.to_toml())
    assert tomllib.loads(written.read_text())["algorithm"]["aggregator"] == "dp_adaptive"
    again = _resolve("--config", str(written))
    assert again.to_dict() == config.to_dict()

    from coordinator.algorithm.spec import AlgorithmSpec

    spec = AlgorithmSpec.from_config(again, num_classes=10)
    assert spec.blocks.server_optimizer == "adam" and spec.server_learning_rate == 0.03
    assert spec.clients_per_round == 10
    assert spec.optimizer_parameters("server") == {"beta_1": 0.9, "beta_2": 0.99, "epsilon": 1e-3}
    assert spec.optimizer_parameters("client") == {}
    assert "dp_adaptive" in spec.describe() and "proximal mu 0.1" in spec.describe()


def test_changing_a_block_on_resume_is_refused_but_not_the_reporting_delta():
    saved = _resolve("--aggregator", "dp_fixed").to_dict()
    changed = _resolve(
        "--aggregator", "dp_fixed", "--noise-multiplier", "0.7", "--dp-delta", "1e-6"
    )
    assert config_lib.resume_conflicts(saved, changed) == ["algorithm.noise_multiplier: 0.5 -> 0.7"]
    assert config_lib.resume_conflicts(saved, _resolve("--aggregator", "robust")) == [
        "algorithm.aggregator: 'dp_fixed' -> 'robust'",
        "algorithm.weighting: 'uniform' -> 'examples'",
    ]


def test_the_algorithm_settings_take_no_other_command():
    for command in ("data", "worker", "status", "compare", "blocks"):
        parser = argparse.ArgumentParser()
        config_lib.add_arguments(parser, command)
        assert "--aggregator" not in parser.format_help(), command


def test_blocks_command_lists_every_choice_and_parameter():
    result = fedcompose("blocks", timeout=60)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    for choices in (
        config_lib.DISTRIBUTORS,
        config_lib.CLIENT_WORKS,
        config_lib.AGGREGATORS,
        config_lib.OPTIMIZERS,
    ):
        for choice in choices:
            assert f"  {choice} " in text, choice
    for f in dataclasses.fields(config_lib.AlgorithmConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
    # An on-by-default switch says how to turn it off.
    assert "--zeroing / --no-zeroing" in text and "--clipping / --no-clipping" in text


def test_empty_clients_are_harmless_only_for_example_weighted_aggregates():
    from coordinator.algorithm import AlgorithmSpec, aggregator

    def harmless(**blocks) -> bool:
        return aggregator.empty_clients_harmless(AlgorithmSpec.from_dict({"blocks": blocks}))

    assert harmless()
    assert harmless(aggregator="robust", zeroing_norm=5.0, clipping_norm=1.0)
    assert harmless(aggregator="robust", zeroing=False, clipping=False)
    assert not harmless(weighting="uniform")
    assert not harmless(aggregator="robust")  # adaptive estimates count clients
    assert not harmless(aggregator="robust", zeroing_norm=5.0)
    assert not harmless(aggregator="compression")
    assert not harmless(aggregator="dp_fixed")
    assert not harmless(aggregator="dp_adaptive")


def test_privacy_accountant_composes_rounds_as_dp_accounting_does():
    import dp_accounting
    from dp_accounting import rdp

    from coordinator.privacy.accountant import PrivacyAccountant, round_event

    def spent(z: float, rounds: list[tuple[int, int]]) -> float:
        accountant = PrivacyAccountant(z, 1e-5)
        for pool, drawn in rounds:
            accountant.add_round(pool, drawn)
        return accountant.epsilon()

    def fresh(z: float, rounds: list[tuple[int, int]]) -> float:
        accountant = rdp.RdpAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
        )
        for pool, drawn in rounds:
            accountant.compose(round_event(z, pool, drawn), 1)
        return accountant.get_epsilon(1e-5)

    for rounds in (1, 7, 30):
        assert spent(0.8, [(60, 10)] * rounds) == pytest.approx(
            fresh(0.8, [(60, 10)] * rounds), rel=1e-9
        )
    # Rounds drawn from fewer clients (a worker down), all of them included.
    mixed = [(60, 10), (40, 10), (60, 10), (8, 8), (40, 10)]
    assert spent(0.8, mixed) == pytest.approx(fresh(0.8, mixed), rel=1e-9)
    eps = [spent(0.8, [(60, 10)] * r) for r in (1, 5, 30)]
    assert eps == sorted(eps) and eps[0] > 0
    # More noise, fewer clients sampled or a larger population: less privacy spent.
    assert spent(2.0, [(60, 10)] * 30) < eps[-1]
    assert spent(0.8, [(600, 10)] * 30) < eps[-1]
    # A round drawn from fewer clients spends more; one taking every client, most.
    assert spent(0.8, [(60, 10), (30, 10)]) > spent(0.8, [(60, 10)] * 2)
    assert spent(0.8, [(60, 10), (10, 10)]) > spent(0.8, [(60, 10), (30, 10)])
    assert math.isinf(spent(0.0, [(60, 10)]))
    nothing = PrivacyAccountant(0.0, 1e-5)
    nothing.add_round(60, 10)
    assert nothing.record()["epsilon"] is None
    assert PrivacyAccountant(0.8, 1e-5).epsilon() == 0.0
    with pytest.raises(ValueError):
        PrivacyAccountant(0.8, 1e-5).add_round(10, 11)
    # The event is the sampling the federation does: 10 of 60 without replacement,
    # Gaussian noise of half TFF's multiplier (replace-one doubles the sensitivity).
    event = round_event(0.8, 60, 10)
    assert isinstance(event, dp_accounting.SampledWithoutReplacementDpEvent)
    assert (event.source_dataset_size, event.sample_size) == (60, 10)
    assert event.event.noise_multiplier == 0.4
