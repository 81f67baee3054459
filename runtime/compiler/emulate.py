"""Running a servable's build for another architecture on this machine, under QEMU user-mode emulation.

A cross-compiled build (runtime/compiler/cross.py) cannot be loaded into this Python, so its bucket
libraries are driven by a small native program (harness.cc, cross-compiled for the target) that
calls their kiln_* functions, run by Debian's qemu-user with the cross toolchain's sysroot and the
target's libtensorflow_framework.so.2. Inputs and outputs pass as raw files. This checks that the
code computes what TensorFlow does; emulation says nothing about its speed on real hardware.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from runtime.cache import cache_root
from runtime.compiler.toolchain import run
from runtime.cpu import architecture_of
from runtime.errors import CompileError
from runtime.manifest import Manifest

HARNESS_SOURCE = Path(__file__).with_name("harness.cc")
# Architecture -> (QEMU's user-mode emulator, the cross toolchain's sysroot).
EMULATORS = {"aarch64": ("qemu-aarch64", Path("/usr/aarch64-linux-gnu"))}


def harness(architecture: str) -> Path:
    """harness.cc built for `architecture` (cached, keyed by its source)."""
    from runtime.compiler.target import cross_compiler

    digest = hashlib.sha256(HARNESS_SOURCE.read_bytes()).hexdigest()[:16]
    built = cache_root() / "harness" / f"kiln_harness-{architecture}-{digest}"
    if not built.exists():
        built.parent.mkdir(parents=True, exist_ok=True)
        tmp = built.with_name(f".{built.name}.{os.getpid()}.tmp")
        run(
            [cross_compiler(architecture), "-O2", "-std=c++17", str(HARNESS_SOURCE), "-o", str(tmp), "-ldl"],
            "building the emulation harness",
        )
        os.replace(tmp, built)
    return built


def run_emulated(
    servable: Path, manifest: Manifest, architecture: str, calls: Sequence[tuple[str, int, Mapping[str, np.ndarray]]]
) -> list[dict[str, np.ndarray]]:
    """Each (signature, bucket, inputs) run by the servable's `architecture` build in one emulated
    process; inputs have the bucket's full shape (padding is the caller's). Returns each call's
    outputs, at the bucket's shape."""
    emulator, sysroot = EMULATORS[architecture]
    if shutil.which(emulator) is None:
        raise CompileError(f"emulating {architecture} needs {emulator} (Debian: apt-get install qemu-user)")
    from runtime.compiler.cross import target_tensorflow

    if architecture not in {architecture_of(target.triple) for target in manifest.targets}:
        raise CompileError(f"{servable} has no build for {architecture}")
    build = manifest.for_architecture(architecture)
    framework = target_tensorflow(architecture, manifest.tensorflow_version)
    with tempfile.TemporaryDirectory(prefix="kiln-emulate-") as scratch:
        command, shapes = (
            [emulator, "-L", str(sysroot), "-E", f"LD_LIBRARY_PATH={framework}", str(harness(architecture))],
            [],
        )
        for n, (key, bucket, inputs) in enumerate(calls):
            signature = build.signatures[key]
            command.append(str(servable / signature.libraries[bucket]))
            for name, array in inputs.items():
                path = Path(scratch) / f"{n}-in-{len(command)}"
                spec = signature.input(name)
                if spec is None:
                    raise CompileError(f"signature {key} has no input {name}")
                np.ascontiguousarray(array, dtype=spec.dtype).tofile(path)
                command.append(f"in:{name}={path}")
            outputs = {}
            for spec in signature.outputs:
                shape = signature.buffer_shape(spec, bucket)
                outputs[spec.name] = (Path(scratch) / f"{n}-out-{len(command)}", np.dtype(spec.dtype), shape)
                command.append(f"out:{spec.name}={outputs[spec.name][0]}")
            command.append("--")
            shapes.append(outputs)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise CompileError(
                f"the emulated {architecture} run failed ({done.returncode}): {done.stderr.strip()[-2000:]}"
            )
        return [
            {name: np.fromfile(path, dtype).reshape(shape) for name, (path, dtype, shape) in outputs.items()}
            for outputs in shapes
        ]
