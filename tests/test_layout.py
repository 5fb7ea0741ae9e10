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
