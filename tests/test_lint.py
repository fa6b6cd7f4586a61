"""The package type-checks (mypy) and the code lints (ruff), as configured in pyproject.toml."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)


def test_mypy_is_clean():
    r = _run("mypy")
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_is_clean():
    r = _run("ruff", "check", "--no-cache", "deltastream", "tests", "benchmarks")
    assert r.returncode == 0, r.stdout + r.stderr
