"""The documentation site builds with `--strict`, its generated reference says
what the code does, and the README's links lead into it.

The site is built into a temporary directory, never into the repository.
"""

from __future__ import annotations

import html
import importlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deploy import cli
from shared import errors

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BUILD_TIMEOUT = 300


def build_site(config_dir: Path, site_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=config_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    # What a build would write by default: the site, and mkdocs-jupyter's cache.
    by_default = [ROOT / "site", ROOT / ".cache"]
    before = [path.exists() for path in by_default]
    site_dir = tmp_path_factory.mktemp("site")
    result = build_site(ROOT, site_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # --strict aborts on a warning anyway; this names the warning if it ever does not.
    assert not re.search(r"^WARNING\b", result.stderr, re.MULTILINE), result.stderr[-3000:]
    assert [path.exists() for path in by_default] == before, "the build wrote into the repo"
    return site_dir


def _text(page: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))


def test_every_page_and_notebook_is_built(site: Path):
    for page in (ROOT / "docs").rglob("*.md"):
        relative = page.relative_to(ROOT / "docs").with_suffix("")
        built = site / ("index.html" if relative.name == "index" else relative / "index.html")
        assert built.is_file(), relative
    for notebook in (ROOT / "docs" / "tutorials").glob("*.ipynb"):
        assert (site / "tutorials" / notebook.stem / "index.html").is_file(), notebook.name


def test_cli_reference_has_every_command_and_flag_with_its_default(site: Path):
    text = _text(site / "reference" / "cli" / "index.html")
    for name in cli.SUBCOMMANDS:
        assert f"fedcompose {name}" in text
        module = importlib.import_module(cli.SUBCOMMANDS[name][0])
        parser = cli.command_parser(name, module.DESCRIPTION)
        for action in parser._actions:
            for option in action.option_strings:
                assert option in text, f"{name}: {option}"
    # A default, a bound and a choice list, as --help gives them.
    assert "--round-timeout FLOAT 300.0" in " ".join(text.split())
    assert "--aggregator {mean,robust,compression,dp_fixed,dp_adaptive,secure} mean" in " ".join(
        text.split()
    )


def test_exit_code_table_is_the_code_table(site: Path):
    text = " ".join(_text(site / "reference" / "exit-codes" / "index.html").split())
    for c in errors.EXIT_CODES:
        assert f"{c.code} {c.kind} {' '.join(c.meaning.replace('`', '').split())}" in text, c


def test_a_broken_link_fails_the_build(tmp_path: Path):
    """The strict build is what catches a broken link; shown on a copy of the site."""
    copy = tmp_path / "repo"
    copy.mkdir()
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", copy / "docs")
    page = copy / "docs" / "data.md"
    page.write_text(page.read_text() + "\nSee [the old page](no-such-page.md).\n")
    result = build_site(copy, tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-page.md" in result.stderr


README_LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_readme_links_lead_to_pages_of_the_site():
    links = README_LINK.findall(README.read_text())
    local = [link for link in links if not re.match(r"^[a-z]+:", link)]
    assert any(link.startswith("docs/") for link in local)
    for link in local:
        path = link.split("#", 1)[0]
        assert not Path(path).is_absolute(), link
        assert (ROOT / path).exists(), f"README links to {link}, which does not exist"
        if path.startswith("docs/") and path.endswith(".md"):
            assert not path.startswith("docs/hooks/"), link


def test_readme_is_short_and_keeps_its_fixed_parts():
    text = README.read_text()
    assert len(text.splitlines()) <= 200, "README is past 200 lines; move detail to docs/"
    assert "./deploy/run.sh " in text and "./deploy/test.sh " in text
    # The Python example: the tutorial's process trained across workers.
    section = text.split("## From Python", 1)[1].split("\n## ", 1)[0]
    assert "fedcompose.LocalFederation(" in section and ".train(" in section
    assert "```mermaid" in text
    for name in cli.SUBCOMMANDS:
        assert f"| `fedcompose {name}" in text, f"the commands table lacks {name}"
