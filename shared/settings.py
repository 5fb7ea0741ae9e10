"""How settings are declared once and become flags, config tables, help and checks.

A setting is a dataclass field made with `setting(...)`: its default, its help
text and its rules (choices, bounds, whether a resume may change it). A
section is a dataclass of settings and becomes a TOML table; a `Command`
names the settings a command takes. From these declarations alone come every
command's flags and `--help`, the config file's tables and keys, the
coercion of TOML values and the per-setting validation, so none of them can
drift from the others. A flag is the setting's name with `-` for `_`, the
same in every command.

Sweeps: a command may take some settings as comma-separated lists (the
benchmark measures several models, client counts and worker counts); each
element is checked by the same rules.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from shared.errors import UsageError


def setting(
    default: Any,
    help: str,
    *,
    choices: Iterable[str] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    below: float | None = None,
    fixed_on_resume: bool = False,
    metavar: str | None = None,
) -> Any:
    """A setting: its default, help text and rules.

    `minimum`/`maximum` are inclusive bounds, `above`/`below` exclusive ones.
    Floats must be finite. `fixed_on_resume`: resuming a run with another
    value is refused (it would change what the run computes).
    """
    metadata = {
        "help": help,
        "choices": tuple(choices) if choices else None,
        "minimum": minimum,
        "maximum": maximum,
        "above": above,
        "below": below,
        "fixed_on_resume": fixed_on_resume,
        "metavar": metavar,
    }
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"setting {f.name} is declared without a default")


def kind_of(f: dataclasses.Field) -> type:
    return type(field_default(f))


@dataclasses.dataclass(frozen=True)
class Command:
    """The settings one command takes.

    `takes` maps a section to the names it takes from it (`"*"`: all);
    `sweep` names settings given as comma-separated lists; `defaults`
    overrides a declared default for this command; `required` settings must
    be set by a flag or the config file.
    """

    name: str
    takes: Mapping[str, tuple[str, ...] | str]
    sweep: frozenset[str] = frozenset()
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    required: frozenset[str] = frozenset()
    accepts_config_file: bool = True
    positional: str | None = None
    """A list setting taken as the command's positional arguments (`compare RUN_DIR...`)."""

    def fields(self, sections: Mapping[str, type]) -> list[tuple[str, dataclasses.Field]]:
        chosen = []
        for section, names in self.takes.items():
            for f in dataclasses.fields(sections[section]):
                if names == "*" or f.name in names:
                    chosen.append((section, f))
        return chosen

    def default(self, section: str, f: dataclasses.Field) -> Any:
        return self.defaults.get(f.name, field_default(f))


def check_unique_names(sections: Mapping[str, type]) -> None:
    """Every setting's name (hence its flag) is unique across sections."""
    seen: dict[str, str] = {}
    for section, cls in sections.items():
        for f in dataclasses.fields(cls):
            if f.name in seen:
                raise AssertionError(
                    f"setting {f.name} declared in [{seen[f.name]}] and [{section}]"
                )
            seen[f.name] = section


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def to_toml(values: Mapping[str, Mapping[str, Any]], title: str) -> str:
    lines = [f"# {title}"]
    for section, fields in values.items():
        lines.append(f"\n[{section}]")
        for key, value in fields.items():
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def comma_list(text: str) -> list[str]:
    return [item.strip() for item in str(text).split(",") if item.strip()]


def add_arguments(
    parser: argparse.ArgumentParser, command: Command, sections: Mapping[str, type]
) -> None:
    """A flag per setting the command takes. Flags default to "not given", so
    that only flags actually given override the config file."""
    if command.accepts_config_file:
        parser.add_argument(
            "--config",
            type=Path,
            default=None,
            metavar="FILE",
            help="TOML file with a table per section ("
            + ", ".join(f"[{s}]" for s in command.takes)
            + "); flags override it",
        )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for section, f in command.fields(sections):
        group = groups.get(section) or parser.add_argument_group(f"[{section}]")
        groups[section] = group
        default = command.default(section, f)
        kind = kind_of(f)
        swept = f.name in command.sweep
        if default in ("", []):
            shown = "none"
        elif isinstance(default, list):
            shown = ",".join(str(v) for v in default)
        else:
            shown = _toml_value(default).strip('"')
        help_text = f.metadata["help"]
        if f.name in command.required:
            help_text += " (required)"
        elif swept:
            help_text += f" (comma-separated list; default: {shown})"
        else:
            help_text += f" (default: {shown})"
        kwargs: dict[str, Any] = {
            "dest": f"{section}.{f.name}",
            "default": argparse.SUPPRESS,
            "help": help_text,
        }
        choices = f.metadata.get("choices")
        if f.name == command.positional:
            # argparse keeps a positional's own default (None when not given).
            group.add_argument(
                f"{section}.{f.name}",
                nargs="*",
                default=None,
                metavar=f.metadata.get("metavar") or f.name.upper(),
                help=help_text,
            )
            continue
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif swept or kind is list:
            kwargs["type"] = str
            kwargs["metavar"] = f.metadata.get("metavar") or "A,B,..."
        else:
            kwargs["type"] = str  # converted (with a clear message) by `resolve`
            if choices:
                kwargs["metavar"] = "{" + ",".join(choices) + "}"
            else:
                kwargs["metavar"] = f.metadata.get("metavar") or kind.__name__.upper()
        group.add_argument(flag(f.name), **kwargs)


MAX_CONFIG_BYTES = 1024 * 1024
"""A config file is a few KiB; anything past this is not one."""


def load_file(path: Path, sections: Mapping[str, type]) -> dict[str, dict[str, Any]]:
    """A config file's tables, checked against the declared sections."""
    where = f"config file {path}"
    raw = _read_toml(path, where)
    _check_tables(raw, sections, where)
    return raw


def _read_toml(path: Path, where: str) -> dict[str, Any]:
    """The file's TOML, read within the size bound; one line for what is wrong."""
    try:
        with open(path, "rb") as f:
            # Bounded: `--config /dev/zero` read until memory ran out.
            data = f.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise UsageError(
                f"{where} is larger than {MAX_CONFIG_BYTES // 1024} KiB; give a TOML config file"
            )
        raw = tomllib.loads(data.decode("utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{where} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{where} is a directory; give a TOML file") from None
    except PermissionError:
        raise UsageError(f"{where} cannot be read (permission denied)") from None
    except UnicodeDecodeError:
        raise UsageError(f"{where} is not UTF-8 text; give a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{where} is not valid TOML: {e}") from None
    except OSError as e:
        raise UsageError(f"{where} cannot be read ({e.strerror or e})") from None
    return raw


def _check_tables(raw: dict[str, Any], sections: Mapping[str, type], where: str) -> None:
    """Every top-level key is a declared table and every key in it a declared setting."""
    owners = {f.name: name for name, cls in sections.items() for f in dataclasses.fields(cls)}
    for section, values in raw.items():
        if not isinstance(values, dict):
            # `rounds = 5` above every table is a key, not a table named [rounds].
            if section in owners:
                raise UsageError(
                    f"{where}: {section} is set outside any table; put it under [{owners[section]}]"
                )
            if section in sections:
                raise UsageError(f"{where}: [{section}] must be a table")
            raise UsageError(
                f"{where}: unknown setting {section} outside any table; settings go in "
                f"tables: {', '.join(f'[{s}]' for s in sections)}"
            )
        if section not in sections:
            raise UsageError(f"{where}: unknown table [{section}]; use {', '.join(sections)}")
        known = {f.name for f in dataclasses.fields(sections[section])}
        for key in values:
            if key not in known:
                raise UsageError(
                    f"{where}: unknown setting {section}.{key}; "
                    f"[{section}] takes {', '.join(sorted(known))}"
                )


def _number(text: str, kind: type, name: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise UsageError(
            f"{flag(name)} takes {'an integer' if kind is int else 'a number'}, got {text!r}"
        ) from None


def _check_text(name: str, value: Any) -> None:
    """Text from the command line that is not UTF-8 (say a path with a byte
    from another encoding) cannot be recorded in a config file or passed on."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raw = value.encode("utf-8", "surrogateescape")
            raise UsageError(
                f"{flag(name)}: {raw!r} is not UTF-8 text; use a name that is"
            ) from None


def coerce(name: str, value: Any, kind: type, *, text: bool = True) -> Any:
    """A flag's text or a TOML value as the setting's type.

    `text`: the value is a flag's text, which is how numbers come from the
    command line; in a TOML file a number is written as one (`rounds = "10"`
    is text, and was silently taken as 10).
    """
    for item in value if isinstance(value, list) else [value]:
        _check_text(name, item)
    if kind is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{flag(name)} must be true or false, got {value!r}")
        return value
    if kind is list:
        if isinstance(value, str):
            return comma_list(value)
        if not isinstance(value, list):
            raise UsageError(f"{flag(name)} must be a list, got {value!r}")
        return [str(v) for v in value]
    if isinstance(value, str) and kind in (int, float):
        if not text:
            raise UsageError(
                f"{flag(name)} must be {'an integer' if kind is int else 'a number'}, got "
                f"the text {value!r}; write numbers without quotes (several: [1, 2])"
            )
        return _number(value, kind, name)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        what = {int: "an integer", float: "a number", str: "text (a string)"}.get(
            kind, f"a {kind.__name__}"
        )
        raise UsageError(f"{flag(name)} must be {what}, got {value!r}")
    return value


def check(f: dataclasses.Field, value: Any, name: str | None = None) -> None:
    """The declared rules of one setting (`name`: what to call it; its flag by default)."""
    name = name or flag(f.name)
    m = f.metadata
    if m.get("choices") and value not in m["choices"]:
        raise UsageError(
            f"{name}: unknown value {value!r}; choose one of {', '.join(m['choices'])}"
        )
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, got {value}")
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        # What TensorFlow, numpy and gRPC take; --batch-size 1e20 was an OverflowError.
        raise UsageError(f"{name} must be an integer below 2**63, got {value}")
    bounds = []
    if m.get("above") is not None:
        bounds.append((value > m["above"], f"> {m['above']:g}"))
    if m.get("below") is not None:
        bounds.append((value < m["below"], f"< {m['below']:g}"))
    if m.get("minimum") is not None:
        bounds.append((value >= m["minimum"], f">= {m['minimum']:g}"))
    if m.get("maximum") is not None:
        bounds.append((value <= m["maximum"], f"<= {m['maximum']:g}"))
    for ok, rule in bounds:
        if not ok:
            raise UsageError(f"{name} must be {rule}, got {value:g}")


def _flag_values(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The flags given, by section (`section.name` destinations)."""
    flags: dict[str, dict[str, Any]] = {}
    for dest, value in vars(args).items():
        # A positional list not given at all comes as None or [].
        if "." in dest and value is not None and not (isinstance(value, list) and not value):
            section, name = dest.split(".", 1)
            flags.setdefault(section, {})[name] = value
    return flags


def _converted(
    f: dataclasses.Field, value: Any, command: Command, from_file: bool, taken: bool
) -> Any:
    """A flag's or config file's value as its declaration's kind: a list of
    them for a setting the command sweeps (or another command's sweep in the file)."""
    name = f.name
    if name in command.sweep:
        if from_file and isinstance(value, str) and kind_of(f) is not str:
            items = [value]  # refused below as text, not split as a flag's list
        else:
            items = value if isinstance(value, list) else comma_list(value)
        if not items:
            raise UsageError(f"{flag(name)} needs at least one value")
        return [coerce(name, item, kind_of(f), text=not from_file) for item in items]
    if from_file and not taken and isinstance(value, list) and kind_of(f) is not list:
        # Another command's sweep (bench's clients_per_round = [10, 100]).
        return [coerce(name, item, kind_of(f), text=False) for item in value]
    return coerce(name, value, kind_of(f), text=not from_file)


def _check_taken(
    config: Any, command: Command, sections: Mapping[str, type], given: set[str]
) -> None:
    """Every setting the command takes, checked; a required one must be given."""
    for section, f in command.fields(sections):
        value = getattr(getattr(config, section), f.name)
        for item in value if f.name in command.sweep and isinstance(value, list) else [value]:
            check(f, item)
        if f.name in command.required and f.name not in given and value in ("", [], None):
            if f.name == command.positional:
                what = f.metadata.get("metavar") or f.name.upper()
                raise UsageError(f"give at least one {what}: fedcompose {command.name} {what}...")
            raise UsageError(f"{flag(f.name)} is required")


def resolve(
    args: argparse.Namespace,
    command: Command,
    sections: Mapping[str, type],
    make: Callable[[], Any],
) -> Any:
    """Defaults, then the config file, then flags; each value coerced and
    checked by its declaration. Returns `make()` filled in, with `given` set
    to the names of the settings a flag or the config file gave, and
    `flagged` to those a flag gave."""
    config = make()
    for section, f in command.fields(sections):
        setattr(getattr(config, section), f.name, command.default(section, f))
    given: set[str] = set()
    config_path = getattr(args, "config", None)
    layers: list[dict[str, dict[str, Any]]] = []
    if config_path is not None:
        layers.append(load_file(config_path, sections))
    flags = _flag_values(args)
    layers.append(flags)
    taken = {f.name for _, f in command.fields(sections)}
    for layer in layers:
        from_file = layer is not flags
        for section, values in layer.items():
            target = getattr(config, section)
            declared = {f.name: f for f in dataclasses.fields(sections[section])}
            for name, value in values.items():
                f = declared[name]
                converted = _converted(f, value, command, from_file, name in taken)
                if from_file and name not in taken:
                    # Every table of the file is checked, whatever the command uses
                    # of it: the same file serves every command, and a bad value
                    # found only by the next command to use it (nan, a negative
                    # rate, an unknown model) is found late.
                    label = f"config file {config_path}: {section}.{name}"
                    for item in converted if isinstance(converted, list) else [converted]:
                        if not isinstance(item, list):
                            check(f, item, label)
                setattr(target, name, converted)
                given.add(name)
    _check_taken(config, command, sections, given)
    config.given = frozenset(given)
    config.flagged = frozenset(name for values in flags.values() for name in values)
    if command.sweep:
        for section, f in command.fields(sections):
            value = getattr(getattr(config, section), f.name)
            if f.name in command.sweep and not isinstance(value, list):
                setattr(getattr(config, section), f.name, [value])
    return config
