"""The exit codes live in one table, and errors are quoted in one line one way."""

from __future__ import annotations

import json

import pytest

from deploy import cli
from shared import errors


def _error_classes() -> list[type[errors.FedcomposeError]]:
    found, todo = [], [errors.FedcomposeError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_error_exits_with_a_code_of_the_table():
    codes = {c.code for c in errors.EXIT_CODES}
    for cls in _error_classes():
        assert cls.exit_code in codes, cls
    assert errors.INTERRUPTED in codes and errors.FAILURE in codes
    assert len(codes) == len(errors.EXIT_CODES), "a code listed twice"


def test_fedcompose_help_lists_the_table(capsys):
    assert cli.main(["--help"]) == 0
    epilog = " ".join(capsys.readouterr().out.split())
    listed = ", ".join(f"{c.code} {c.kind}" for c in errors.EXIT_CODES)
    assert f"Exit codes: {listed}." in epilog


def test_no_command_is_a_usage_error(capsys):
    assert cli.main([]) == errors.UsageError.exit_code


@pytest.mark.parametrize(
    ("error", "limit", "expected"),
    [
        (ValueError("bad\n  value"), 200, "ValueError: bad value"),
        (KeyError("round"), 200, "KeyError: 'round'"),
        (RuntimeError(), 200, "RuntimeError"),
        (errors.RunDirError("run dir\nheld"), 200, "run dir held"),
        ("a\tb\n c", 200, "a b c"),
        ("x" * 20, 10, "xxxxxxx..."),
        ("x" * 20, None, "x" * 20),
    ],
)
def test_one_line(error, limit, expected):
    assert errors.one_line(error, limit) == expected


def test_one_line_of_a_decode_error_names_its_type():
    try:
        json.loads("{")
    except ValueError as e:
        assert errors.one_line(e).startswith("JSONDecodeError: Expecting")
