"""A cached venv for a batch engine whose pins this environment cannot take (apache-beam: pillow<13,
pyarrow<26): made once with --system-site-packages, so it adds only what differs, under
cache_root()/venvs keyed by the extra's requirements (read from pyproject.toml) and this Python."""

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
    wanted = requirements(extra)
    key = hashlib.sha256("\n".join([sys.version, sys.prefix, *wanted]).encode()).hexdigest()[:16]
    venvs = cache_root() / "venvs"
    venvs.mkdir(parents=True, exist_ok=True)
    place = venvs / f"{extra}-{key}"
    with open(venvs / f".{extra}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time; later callers find it done
        if not (place / "bin" / "python").exists():
            staging = venvs / f".{extra}-{key}.partial-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(staging)], check=True)
            subprocess.run([str(staging / "bin" / "python"), "-m", "pip", "install", "--quiet",
                            "--disable-pip-version-check", *wanted], check=True)
            staging.rename(place)  # bin/python finds its venv by pyvenv.cfg beside it, wherever it is
    return place / "bin" / "python"
