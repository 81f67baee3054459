"""Building for another architecture than this machine's: aarch64 (Graviton) servables on x86-64.

tfcompile writes the model's code for any triple. The rest of a servable (the AOT runtime, Kiln's
kernels, the shims, the links) is C++ built by Debian's cross compiler against the TensorFlow of the
same version built for the target: its wheel for that platform, downloaded once with pip, of which
only the headers, the AOT runtime sources and libtensorflow_framework.so.2 (whose Abseil the code
links against) are unpacked, under the cache dir keyed by version and architecture. For the host's
own architecture the installed TensorFlow and $CXX are used, as before.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from runtime.cache import cache_root
from runtime.compiler.target import cross_compiler
from runtime.compiler.toolchain import Toolchain
from runtime.cpu import architecture_of, host_architecture
from runtime.errors import CompileError
from runtime.manifest import Target

# Architecture -> the wheel platform TensorFlow publishes for it.
WHEEL_PLATFORMS = {"aarch64": "manylinux_2_27_aarch64"}
UNPACKED = ("tensorflow/include/", "tensorflow/xla_aot_runtime_src/", "tensorflow/libtensorflow_framework.so.2")


def toolchain_for(target: Target) -> Toolchain:
    """The toolchain building a servable's C++ for `target`."""
    architecture = architecture_of(target.triple)
    if architecture == host_architecture():
        return Toolchain.for_installed_tensorflow(target.cpu)
    cxx = cross_compiler(architecture)
    if shutil.which(cxx) is None:
        raise CompileError(
            f"building for {target.triple} needs {cxx} (Debian: apt-get install g++-{architecture}-linux-gnu)"
        )
    import tensorflow as tf

    return Toolchain(target_tensorflow(architecture, tf.__version__), tf.__version__, target.cpu, cxx)


def target_tensorflow(architecture: str, version: str) -> Path:
    """The unpacked `tensorflow/` of TensorFlow `version`'s wheel for `architecture` (cached)."""
    entry = cache_root() / "tensorflow-wheels" / f"{version}-{architecture}"
    if (entry / "tensorflow").is_dir():
        return entry / "tensorflow"
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / f".{entry.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (entry / "tensorflow").is_dir():
            _unpack(architecture, version, entry)
    return entry / "tensorflow"


def _unpack(architecture: str, version: str, entry: Path) -> None:
    """Download the wheel into a scratch directory, unpack the parts a build needs, rename into place."""
    with tempfile.TemporaryDirectory(dir=entry.parent, prefix=f".{entry.name}-") as scratch:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--only-binary=:all:",
                "--platform",
                WHEEL_PLATFORMS[architecture],
                f"tensorflow=={version}",
                "-d",
                scratch,
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise CompileError(
                f"downloading TensorFlow {version} for {architecture} failed:\n"
                + "\n".join(done.stderr.strip().splitlines()[-10:])
            )
        wheel = next(Path(scratch).glob("*.whl"))
        unpacked = Path(scratch) / "unpacked"
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(unpacked, [name for name in archive.namelist() if name.startswith(UNPACKED)])
        wheel.unlink()
        os.replace(unpacked, entry)
