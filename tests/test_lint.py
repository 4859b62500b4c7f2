"""ruff and mypy --strict are part of the test run: a red lint is a red build."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, check=False)


def test_ruff() -> None:
    lint = _tool("ruff", "check", "vivarium", "tests", "bench")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = _tool("ruff", "format", "--check", "vivarium", "tests", "bench")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_mypy_strict() -> None:
    result = _tool("mypy", "--strict", "vivarium", "tests", "bench")
    assert result.returncode == 0, result.stdout + result.stderr
