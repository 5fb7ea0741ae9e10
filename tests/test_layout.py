"""A package that lists its modules in its docstring lists every one, and only those.

Such a listing is where a newcomer looks first; one that leaves a module out
(`executor_client` without `connection.py`) sends them looking elsewhere.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("coordinator", "client_worker", "shared", "deploy")
LISTED = re.compile(r"^\s*([a-z_][a-z0-9_]*\.py)\b", re.MULTILINE)


def _packages_with_listings() -> list[Path]:
    found = []
    for top in PACKAGES:
        for init in sorted((ROOT / top).rglob("__init__.py")):
            if LISTED.search(ast.get_docstring(ast.parse(init.read_text())) or ""):
                found.append(init.parent)
    return found


def test_some_packages_list_their_modules():
    assert len(_packages_with_listings()) >= 5


@pytest.mark.parametrize(
    "package", _packages_with_listings(), ids=lambda p: str(p.relative_to(ROOT))
)
def test_listing_matches_the_modules(package: Path):
    docstring = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    listed = set(LISTED.findall(docstring))
    present = {p.name for p in package.glob("*.py")} - {"__init__.py"}
    assert listed == present, (
        f"{package.relative_to(ROOT)}/__init__.py: not listed {sorted(present - listed)}, "
        f"listed but absent {sorted(listed - present)}"
    )


NAMED_PATH = re.compile(
    r"\b((?:coordinator|client_worker|shared|deploy|tests|docs)/[\w/.-]*?"
    r"\.(?:py|md|c|sh|service|lock|ipynb|toml))\b"
)


def test_paths_the_code_names_exist():
    """A comment or message that names a file of this repository names one that
    is there (`shared/loopback.py` cited a design document that was not)."""
    stale = []
    for top in (*PACKAGES, "tests"):
        for source in sorted((ROOT / top).rglob("*")):
            if source.suffix not in (".py", ".sh", ".c", ".service") or not source.is_file():
                continue
            for line_no, line in enumerate(source.read_text().splitlines(), 1):
                for path in NAMED_PATH.findall(line):
                    if not (ROOT / path).exists():
                        stale.append(f"{source.relative_to(ROOT)}:{line_no}: {path}")
    assert not stale, stale
