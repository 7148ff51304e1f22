"""The repository's habits, checked in CI: ruff's lint and format, and mypy on the public modules (pyproject.toml)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "command",
    [["ruff", "check", "."], ["ruff", "format", "--check", "."], ["mypy"]],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_the_check_passes(command):
    tool = [sys.executable, "-m", *command]
    result = subprocess.run(tool, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"`{' '.join(command)}` failed:\n{result.stdout}{result.stderr}"
