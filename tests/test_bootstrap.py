"""deploy/bootstrap.sh where Python 3.11 is missing or the wrong Python is given.

The success path of `uv python install` downloads an interpreter from outside
the package index, which this machine cannot reach; what is checked here is
that bootstrap gets uv from the package index, asks it for 3.11, and says in
one line why it cannot go on, without creating a venv.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

BOOTSTRAP = ROOT / "deploy" / "bootstrap.sh"


def _other_python() -> str:
    """A real interpreter that is not 3.11."""
    candidates = [shutil.which(f"python3.{minor}") for minor in (12, 13, 10, 14)]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[02-9]*/bin/python3")))
    for candidate in filter(None, candidates):
        version = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info[:2])"],
            capture_output=True,
            text=True,
        )
        if version.returncode == 0 and version.stdout.strip() not in ("", "(3, 11)"):
            return candidate
    pytest.fail("this test needs a Python other than 3.11 on the machine (e.g. python3.12)")


def _bootstrap(env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(BOOTSTRAP)], env=env, capture_output=True, text=True, timeout=timeout
    )


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_the_usual_path_is_untouched():
    # A lock or pyproject.toml changed since the venv was made is brought up to
    # date first, so the verdict does not depend on what ran before.
    first = _bootstrap(dict(os.environ))
    assert first.returncode == 0, first.stderr
    result = _bootstrap(dict(os.environ))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # the venv is up to date: nothing to say


def test_python_that_is_not_311_is_refused_in_one_line(tmp_path):
    venv = tmp_path / "venv"
    other = _other_python()
    for python, message in ((other, "TFF 0.87 needs 3.11"), ("/nonexistent", "is not a program")):
        result = _bootstrap({**os.environ, "PYTHON": python, "FEDCOMPOSE_VENV": str(venv)})
        assert result.returncode == 2, result.stderr
        assert len(_errors(result.stderr)) == 1 and message in result.stderr, result.stderr
    assert not venv.exists()


def _path_without_311(tmp_path: Path, python3: str) -> Path:
    """A PATH with every usual command but no Python 3.11 (python3 is `python3`)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for directory in ("/usr/local/bin", "/usr/bin", "/bin"):
        for entry in Path(directory).iterdir() if Path(directory).is_dir() else []:
            if entry.name.startswith(("python", "pip", "uv")) or os.path.lexists(
                bin_dir / entry.name
            ):
                continue
            (bin_dir / entry.name).symlink_to(entry)
    (bin_dir / "python3").symlink_to(python3)
    return bin_dir


@pytest.mark.slow
def test_without_python_311_uv_is_fetched_and_the_reason_told(tmp_path):
    bin_dir = _path_without_311(tmp_path, _other_python())
    venv = tmp_path / "venv"
    env = {
        "HOME": str(tmp_path / "home"),
        "PATH": str(bin_dir),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "FEDCOMPOSE_VENV": str(venv),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    env.update({k: v for k, v in os.environ.items() if k.startswith("PIP_")})
    result = _bootstrap(env, timeout=600)
    lines = result.stderr.splitlines()
    assert (
        lines[0] == "fedcompose: no Python 3.11 found; getting one with uv (from the package index)"
    )
    uv = tmp_path / "cache" / "fedcompose" / "uv-venv" / "bin" / "uv"
    if result.returncode == 0:  # a machine that can download interpreters
        assert "that uv installed" in result.stderr or "that uv found" in result.stderr
        return
    assert result.returncode == 1, result.stderr
    assert len(_errors(result.stderr)) == 1, result.stderr
    assert uv.is_file(), "uv was not installed from the package index"
    assert "uv could not download one" in result.stderr
    assert "install Python 3.11" in result.stderr
    assert not venv.exists()
    # A second run reuses the uv it installed and fails the same way, quickly.
    again = _bootstrap(env, timeout=300)
    assert again.returncode == 1 and _errors(again.stderr) == _errors(result.stderr)
