"""Every setting of a run: defaults, a TOML config file, flags on top.

Fields are declared once, with their help text; the argparse flags, the
`--help` text, the TOML sections and the validation all derive from these
declarations, so they cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from deploy.datasets import PARTITIONS, SOURCES, DataSpec
from shared.model_names import MODELS


class ConfigError(ValueError):
    """An invalid setting; the message names it and says what is allowed."""


def _field(default: Any, help: str, *, choices: Iterable[str] | None = None):
    """A config field: its default, its help text and its allowed values."""
    metadata = {"help": help, "choices": tuple(choices) if choices else None}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class DataConfig:
    source: str = _field(
        "default", "federated dataset to build worker shards from", choices=SOURCES
    )
    emnist_path: str = _field("", "emnist_all.sqlite, or a directory holding (or to cache) it")
    only_digits: bool = _field(True, "EMNIST: digits only (10 classes) instead of all 62 classes")
    partition: str = _field(
        "natural",
        "natural: whole writers; iid / dirichlet: re-deal examples to simulate other settings",
        choices=PARTITIONS,
    )
    alpha: float = _field(
        0.5, "Dirichlet concentration for --partition dirichlet (lower: more skew)"
    )
    writers: int = _field(60, "number of synthetic writers of the default source")
    data_seed: int = _field(0, "seed of the data split and partition")
    shards_dir: str = _field(
        "", "serve shards already built by `fedcompose data` instead of building them"
    )


@dataclasses.dataclass
class FederationConfig:
    workers: int = _field(3, "number of local worker processes (fedcompose run)")
    addresses: list = _field([], "worker addresses host:port, comma separated (fedcompose train)")
    base_port: int = _field(0, "first port for local workers; 0 picks free ports")
    rpc_timeout: float = _field(600.0, "deadline in seconds for any one call to a worker")
    connect_timeout: float = _field(30.0, "seconds to wait for every worker to be reachable")
    worker_check: str = _field(
        "full", "how workers check their shard at start", choices=("full", "quick")
    )


@dataclasses.dataclass
class ModelConfig:
    model: str = _field(
        "linear",
        "linear: the tutorial's dense softmax; cnn: the EMNIST baseline CNN",
        choices=MODELS,
    )


@dataclasses.dataclass
class TrainingConfig:
    rounds: int = _field(30, "number of training rounds")
    clients_per_round: int = _field(10, "clients sampled (without replacement) per round")
    client_learning_rate: float = _field(0.3, "client SGD learning rate")
    server_learning_rate: float = _field(1.0, "server SGD learning rate (finalizer)")
    batch_size: int = _field(20, "client batch size")
    local_epochs: int = _field(1, "passes over its data per client per round")
    clip_norm: float = _field(1.0, "global L2 norm each client gradient is clipped to")
    shuffle_buffer: int = _field(100, "client-side shuffle buffer (1 disables shuffling)")
    seed: int = _field(0, "seed of client sampling and shuffling")


@dataclasses.dataclass
class EvaluationConfig:
    eval_every: int = _field(
        5, "evaluate on every writer's held-out examples every K rounds (0: only at the end)"
    )


@dataclasses.dataclass
class OutputConfig:
    run_dir: str = _field(
        "", "directory of this run (config, metrics, checkpoints, plots); default runs/<time>"
    )
    checkpoint_every: int = _field(1, "save the server state every N rounds (0: only at the end)")
    keep_checkpoints: int = _field(3, "how many recent checkpoints to keep (the first is kept too)")
    verbose: bool = _field(False, "show debug logs and TensorFlow's own output")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "federation": FederationConfig,
    "model": ModelConfig,
    "training": TrainingConfig,
    "evaluation": EvaluationConfig,
    "output": OutputConfig,
}


@dataclasses.dataclass
class RunConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    federation: FederationConfig = dataclasses.field(default_factory=FederationConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)
    output: OutputConfig = dataclasses.field(default_factory=OutputConfig)

    def data_spec(self) -> DataSpec:
        d = self.data
        return DataSpec(
            source=d.source,
            emnist_path=d.emnist_path,
            only_digits=d.only_digits,
            partition=d.partition,
            alpha=d.alpha,
            seed=d.data_seed,
            writers=d.writers,
        )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_toml(self) -> str:
        lines = ["# fedcompose run configuration (resolved: defaults, config file, flags)"]
        for section, values in self.to_dict().items():
            lines.append(f"\n[{section}]")
            for key, value in values.items():
                lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _flag(section_field: dataclasses.Field) -> str:
    return "--" + section_field.name.replace("_", "-")


def add_arguments(
    parser: argparse.ArgumentParser,
    sections: Iterable[str] = SECTIONS,
    exclude: Iterable[str] = (),
) -> None:
    """Adds a flag per config field (but those in `exclude`); defaults are left
    out so that only flags actually given override the config file."""
    excluded = set(exclude)
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML file with [data], [federation], [model], [training], [evaluation], "
        "[output] tables; flags override it",
    )
    for section in sections:
        group = parser.add_argument_group(f"[{section}]")
        for f in dataclasses.fields(SECTIONS[section]):
            if f.name in excluded:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text = f"{f.metadata['help']} (default: {_toml_value(default)})"
            kwargs: dict[str, Any] = {
                "dest": f"{section}.{f.name}",
                "default": argparse.SUPPRESS,
                "help": help_text,
            }
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
                kwargs["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
            if isinstance(default, bool):
                kwargs["action"] = argparse.BooleanOptionalAction
            elif isinstance(default, list):
                kwargs["type"] = _comma_list
                kwargs["metavar"] = "A,B,..."
            else:
                kwargs["type"] = type(default)
                kwargs.setdefault("metavar", type(default).__name__.upper())
            group.add_argument(_flag(f), **kwargs)


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def load_file(path: Path) -> dict[str, dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"config file {path}: unknown table [{section}]; use {', '.join(SECTIONS)}"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path}: [{section}] must be a table")
        known = {f.name for f in dataclasses.fields(SECTIONS[section])}
        for key in values:
            if key not in known:
                raise ConfigError(
                    f"config file {path}: unknown setting {section}.{key}; "
                    f"[{section}] takes {', '.join(sorted(known))}"
                )
    return raw


def resolve(args: argparse.Namespace, sections: Iterable[str] = SECTIONS) -> RunConfig:
    """Defaults, then the config file, then flags; then validation of the
    sections the command uses."""
    overrides: dict[str, dict[str, Any]] = {}
    config_path = getattr(args, "config", None)
    if config_path is not None:
        overrides = load_file(config_path)
    for dest, value in vars(args).items():
        if "." in dest:
            section, name = dest.split(".", 1)
            overrides.setdefault(section, {})[name] = value
    config = RunConfig()
    for section, values in overrides.items():
        target = getattr(config, section)
        for name, value in values.items():
            setattr(target, name, _coerce(section, name, value, type(getattr(target, name))))
    validate(config, uses_data="data" in tuple(sections))
    return config


def _coerce(section: str, name: str, value: Any, kind: type) -> Any:
    where = f"{section}.{name}"
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if kind is list:
        if isinstance(value, str):
            return _comma_list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [str(v) for v in value]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{where} must be a {kind.__name__}, got {value!r}")
    return value


_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def validate(config: RunConfig, uses_data: bool = True) -> None:
    """Rejects impossible settings before anything starts."""
    t, d, f, e, o = (
        config.training,
        config.data,
        config.federation,
        config.evaluation,
        config.output,
    )
    checks = [
        (t.rounds >= 1, "--rounds must be >= 1"),
        (t.clients_per_round >= 1, "--clients-per-round must be >= 1"),
        (t.client_learning_rate > 0, "--client-learning-rate must be > 0"),
        (t.server_learning_rate > 0, "--server-learning-rate must be > 0"),
        (t.batch_size >= 1, "--batch-size must be >= 1"),
        (t.local_epochs >= 1, "--local-epochs must be >= 1"),
        (t.clip_norm > 0, "--clip-norm must be > 0"),
        (t.shuffle_buffer >= 1, "--shuffle-buffer must be >= 1"),
        (d.alpha > 0, "--alpha must be > 0"),
        (d.writers >= 1, "--writers must be >= 1"),
        (f.workers >= 1, "--workers must be >= 1"),
        (f.workers <= 64, "--workers must be <= 64 on one machine"),
        (
            0 <= f.base_port < 65536 - f.workers,
            "--base-port must be in 1024-65535 (0: pick free ports)",
        ),
        (f.rpc_timeout > 0, "--rpc-timeout must be > 0"),
        (f.connect_timeout > 0, "--connect-timeout must be > 0"),
        (e.eval_every >= 0, "--eval-every must be >= 0"),
        (o.checkpoint_every >= 0, "--checkpoint-every must be >= 0"),
        (o.keep_checkpoints >= 1, "--keep-checkpoints must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    for section_name, cls in SECTIONS.items():
        section = getattr(config, section_name)
        for fld in dataclasses.fields(cls):
            choices = fld.metadata.get("choices")
            value = getattr(section, fld.name)
            if choices and value not in choices:
                raise ConfigError(
                    f"{_flag(fld)}: unknown value {value!r}; choose one of {', '.join(choices)}"
                )
    for address in f.addresses:
        match = _ADDRESS.match(address)
        if not match or not 0 < int(match.group(2)) < 65536:
            raise ConfigError(f"--addresses: {address!r} is not host:port")
    if uses_data and d.source == "default" and t.clients_per_round > d.writers and not d.shards_dir:
        raise ConfigError(
            f"--clients-per-round {t.clients_per_round} is more than the {d.writers} writers "
            "of the default data; lower it or raise --writers"
        )


def default_run_dir() -> Path:
    return Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


RESUME_SENSITIVE = {
    "data": ("source", "emnist_path", "only_digits", "partition", "alpha", "writers", "data_seed"),
    "model": ("model",),
    "training": (
        "clients_per_round",
        "client_learning_rate",
        "server_learning_rate",
        "batch_size",
        "local_epochs",
        "clip_norm",
        "shuffle_buffer",
        "seed",
    ),
}


def resume_conflicts(saved: dict[str, dict[str, Any]], current: RunConfig) -> list[str]:
    """Settings that must not change when a run is resumed, and did."""
    now = current.to_dict()
    conflicts = []
    for section, names in RESUME_SENSITIVE.items():
        for name in names:
            before = saved.get(section, {}).get(name)
            if before is not None and before != now[section][name]:
                conflicts.append(f"{section}.{name}: {before!r} -> {now[section][name]!r}")
    return conflicts
