"""MkDocs hook: the command-line reference and the exit-code table, made at build time.

A page holding `<!-- cli-reference -->` or `<!-- exit-codes -->` gets that
marker replaced by tables made from the code itself: every command's parser
as `fedcompose` builds it (`deploy.cli.command_parser`, whose flags, defaults
and help come from the one declaration of every setting in `shared/config.py`)
and `shared.errors.EXIT_CODES`. Nothing is written into the repository.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

# The checkout this file is in, ahead of any installed copy of the project.
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from deploy import cli  # noqa: E402
from shared import errors  # noqa: E402

CLI_MARKER = "<!-- cli-reference -->"
EXIT_CODES_MARKER = "<!-- exit-codes -->"
# How `shared.settings.add_arguments` ends a setting's help.
_NOTE = re.compile(
    r"^(?P<help>.*?)\s*\((?:(?P<required>required)|(?:comma-separated list; )?default: "
    r"(?P<default>.*))\)$",
    re.DOTALL,
)


def on_page_markdown(markdown: str, **_: object) -> str:
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    if EXIT_CODES_MARKER in markdown:
        markdown = markdown.replace(EXIT_CODES_MARKER, exit_code_table())
    return markdown


def _cell(text: str) -> str:
    """Text as one Markdown table cell (`runs/<time>` is not an HTML tag)."""
    text = " ".join(text.split()).replace("|", "\\|")
    return text.replace("&", "&amp;").replace("<", "&lt;")


def _flag(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar} ...`" if action.nargs == "*" else f"`{action.metavar}`"
    if isinstance(action, argparse.BooleanOptionalAction) or action.nargs == 0:
        return ", ".join(f"`{s}`" for s in action.option_strings)
    return ", ".join(
        f"`{s} {action.metavar or action.dest.upper()}`" for s in action.option_strings
    )


def _help_and_default(action: argparse.Action) -> tuple[str, str]:
    text = " ".join((action.help or "").split())
    match = _NOTE.match(text)
    if not match:
        return text, ""
    if match["required"]:
        return match["help"], "required"
    default = match["default"].replace("|", "\\|")
    return match["help"], f"`{default}`"


def command_section(name: str) -> str:
    module_name, _ = cli.SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    parser = cli.command_parser(name, module.DESCRIPTION)
    lines = [
        f"## `fedcompose {name}` {{#{name}}}",
        "",
        " ".join(module.DESCRIPTION.split()),
        "",
    ]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.help is not argparse.SUPPRESS]
        if not actions:
            continue
        title = group.title or ""
        if title.startswith("["):
            title = f"`{title}` (a table of the config file)"
        lines += [f"**{title}**", "", "| flag | default | what |", "| --- | --- | --- |"]
        for action in actions:
            what, default = _help_and_default(action)
            lines.append(f"| {_flag(action)} | {default} | {_cell(what)} |")
        lines.append("")
    return "\n".join(lines)


def cli_reference() -> str:
    lines = ["| command | what it does |", "| --- | --- |"]
    for name, (_, summary) in cli.SUBCOMMANDS.items():
        lines.append(f"| [`fedcompose {name}`](#{name}) | {_cell(summary)} |")
    lines.append("")
    return "\n".join(lines + [command_section(name) for name in cli.SUBCOMMANDS])


def _error_types() -> dict[int, list[str]]:
    by_code: dict[int, list[str]] = {}
    todo = [errors.FedcomposeError]
    while todo:
        cls = todo.pop(0)
        by_code.setdefault(cls.exit_code, []).append(f"`{cls.__name__}`")
        todo.extend(cls.__subclasses__())
    return by_code


def exit_code_table() -> str:
    raised = _error_types()
    lines = ["| code | kind | meaning | raised as |", "| --- | --- | --- | --- |"]
    for c in errors.EXIT_CODES:
        types = ", ".join(raised.get(c.code, [])) or "-"
        lines.append(f"| {c.code} | {c.kind} | {_cell(c.meaning)} | {types} |")
    return "\n".join(lines) + "\n"
