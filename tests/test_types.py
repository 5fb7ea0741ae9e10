"""The type checker: mypy is clean on coordinator/, client_worker/ and shared/,
with the policy of `[tool.mypy]` in pyproject.toml kept (every function
annotated, untyped libraries named one by one, every ignore with its reason)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("coordinator", "client_worker", "shared")
IGNORE = re.compile(r"#\s*type:\s*ignore\b(?P<codes>\[[^\]]*\])?(?P<rest>.*)$")


def _mypy_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]


def test_mypy_is_clean(tmp_path: Path) -> None:
    # A cache of its own: the verdict never rests on what an older tree left in .mypy_cache.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / "mypy-cache"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found" in result.stdout, result.stdout


def test_the_config_checks_the_three_packages_strictly_and_ignores_nothing_wholesale() -> None:
    config = _mypy_config()
    assert sorted(config["files"]) == sorted(PACKAGES)
    assert config["check_untyped_defs"] and config["warn_unused_ignores"]
    assert "ignore_missing_imports" not in config and "ignore_errors" not in config
    overrides = config["overrides"]
    strict = [o for o in overrides if o.get("disallow_untyped_defs")]
    assert [sorted(o["module"]) for o in strict] == [sorted(f"{p}.*" for p in PACKAGES)]
    for override in overrides:
        assert "ignore_errors" not in override, override
        if override.get("ignore_missing_imports"):
            # Libraries, each by name: never one of ours, never everything.
            for module in override["module"]:
                assert module.split(".")[0] not in PACKAGES and module not in ("*", ".*")


def test_every_type_ignore_names_its_error_and_why() -> None:
    bare = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            lines = path.read_text().splitlines()
            for number, line in enumerate(lines, 1):
                found = IGNORE.search(line)
                if found is None:
                    continue
                reason = found["rest"].strip().lstrip("#").strip()
                above = lines[number - 2].strip() if number > 1 else ""
                if not found["codes"] or not (reason or above.startswith("#")):
                    bare.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not bare, "a type: ignore needs [its-code] and a comment saying why:\n" + "\n".join(bare)
