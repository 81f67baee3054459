"""Cached venvs for what this environment cannot hold: a batch engine with pins of its own (apache-beam:
pillow<13, pyarrow<26), made with --system-site-packages so it adds only what differs, and benchmark
peers (PyTriton); under cache_root()/venvs keyed by their requirements and this Python."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from runtime.cache import cache_root

ROOT = Path(__file__).resolve().parents[1]


def requirements(extra: str) -> list[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["optional-dependencies"][extra])


def engine_python(extra: str) -> Path:
    """The venv's python for kiln[extra], made on first use (about 20 s for beam here)."""
    return cached_venv(extra, requirements(extra))


def cached_venv(name: str, wanted: list[str], *, system_site_packages: bool = True) -> Path:
    """The python of a venv holding `wanted`, made once under cache_root()/venvs, keyed by what it holds.
    Without system_site_packages it holds only `wanted` (a peer with pins of its own, such as PyTriton)."""
    key = hashlib.sha256("\n".join([sys.version, sys.prefix, str(system_site_packages), *wanted]).encode()
                         ).hexdigest()[:16]
    venvs = cache_root() / "venvs"
    venvs.mkdir(parents=True, exist_ok=True)
    place = venvs / f"{name}-{key}"
    with open(venvs / f".{name}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; later callers find it done
        if not (place / "bin" / "python").exists():
            staging = venvs / f".{name}-{key}.partial-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            options = ["--system-site-packages"] if system_site_packages else []
            subprocess.run([sys.executable, "-m", "venv", *options, str(staging)], check=True)
            subprocess.run([str(staging / "bin" / "python"), "-m", "pip", "install", "--quiet",
                            "--disable-pip-version-check", *wanted], check=True)
            staging.rename(place)  # bin/python finds its venv by pyvenv.cfg beside it, wherever it is
    return place / "bin" / "python"
