"""The README's two commands install by need: ``make demo`` only the Python package (no root, apt or npm),
``make test`` also what the tests use, and CI runs ``make test``. Read from make's own dry run of every
step a fresh machine would take (``-n -B``: print, do not run, as if nothing were installed yet)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def dry_run(target: str, tmp_path: Path) -> list[str]:
    # A fresh make, also under `make test` (CI): no inherited MAKELEVEL/MAKEFLAGS, no "Entering directory" lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    out = subprocess.run(["make", "--no-print-directory", "-n", "-B", target, f"VENV={tmp_path / 'venv'}"],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def test_demo_installs_the_package_alone_and_runs_it(tmp_path: Path) -> None:
    steps = dry_run("demo", tmp_path)
    text = "\n".join(steps)
    for needs_root_or_npm in ("apt-get", "npm", "dpkg", "sudo", "[dev]"):
        assert needs_root_or_npm not in text, steps
    assert any("pip install" in s and "-c constraints.txt -e ." in s for s in steps), steps
    assert steps[-1] == f"{tmp_path / 'venv'}/bin/fedfleet simulate"


def test_test_installs_what_the_tests_use(tmp_path: Path) -> None:
    text = "\n".join(dry_run("test", tmp_path))
    for step in ("-e '.[dev]'", "apt-get install -y chromium", "openjdk-17-jdk-headless", "junit5",
                 "cd tests/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci", "cd android_demo/web && npm ci",
                 "ruff check", "mypy", "-m pytest"):
        assert step in text


def test_ci_runs_the_readme_test_command() -> None:
    assert (REPO / ".ci" / "run").read_text().strip().splitlines()[-1] == "make test"
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
