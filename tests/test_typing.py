"""Type checking and linting are part of the test suite, so CI runs them: mypy with the pydantic plugin
(pyproject.toml's `[tool.mypy]`, checking `ttscale/`) and ruff (`[tool.ruff]`, the whole repository) must
report no errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_mypy_reports_no_errors() -> None:
    pytest.importorskip("mypy", reason="mypy comes with the dev extra")
    # The cache under the checkout makes later runs incremental; a clean clone pays a couple of minutes once.
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True,
                          timeout=540, check=False)
    assert proc.returncode == 0, f"mypy found errors:\n{proc.stdout}{proc.stderr}"


def test_ruff_reports_no_errors() -> None:
    pytest.importorskip("ruff", reason="ruff comes with the dev extra")
    # pyproject.toml's [tool.ruff] selects the rules (pycodestyle, pyflakes, imports, bugbear, pyupgrade,
    # simplify; lines up to 120) for the whole repository.
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, f"ruff found problems:\n{proc.stdout}{proc.stderr}"
