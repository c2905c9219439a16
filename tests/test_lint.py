"""The code base passes its linter (ruff) and its type checker (mypy), both configured in pyproject.toml."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


def test_ruff_is_clean():
    if importlib.util.find_spec("ruff") is None:
        pytest.fail("ruff is not installed: install the test extras with `pip install -e '.[test]'`")
    paths = [p for p in ("src", "tests", "benchmarks") if (REPO_ROOT / p).is_dir()]
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", *paths], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(900)
def test_mypy_is_clean():
    if importlib.util.find_spec("mypy") is None:
        pytest.fail("mypy is not installed: install the test extras with `pip install -e '.[test]'`")
    # Configured in pyproject.toml ([tool.mypy]: the prism_vfm package).
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
