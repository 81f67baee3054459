"""Shared fixtures: the example servables (built once, cached under ~/.cache/kiln) and small
purpose-built SavedModels for the compiler's edge cases."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def repository(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("repository")


@pytest.fixture(scope="session")
def examples(repository):
    from examples.build import build_examples

    return build_examples(repository)


@pytest.fixture(scope="session")
def digits(examples):
    return examples["digits"]


def run_python(code: str, *args: str, env: dict | None = None):
    """Run code in a fresh interpreter (nothing imported yet), from the repository root."""
    import subprocess

    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=600)
