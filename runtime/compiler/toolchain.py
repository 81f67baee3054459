"""The C++ side of a build: the XLA AOT runtime objects (built once, cached), the shim, the link.

The wheel ships the AOT runtime as sources (tensorflow/xla_aot_runtime_src). Its small "core" files
are always needed; each heavy kernel file instantiates one Eigen template (a matmul or a convolution
for one element type) and takes a minute to build, so a kernel is built only when some compiled
model calls it. Objects are cached under the kiln cache, keyed by TensorFlow version, compiler and
flags, and written atomically so concurrent builds can share them.

The core and the kernels a servable calls are linked once into a shared runtime library, found by its
key (link_runtime; runtime/runtime_library.py), its constants into one weights library
(runtime/compiler/weights.py); each bucket library holds only its shim and generated code and links both.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from runtime.cache import cache_root
from runtime.compiler.target import cpu_flags
from runtime.errors import CompileError
from runtime.progress import steps

SHIM_SOURCE = Path(__file__).with_name("shim.cc")
KILN_KERNELS = Path(__file__).with_name("kernels")

# Which source provides each kernel template, as `nm -C` names it among a shim's undefined symbols.
# Paths are relative to the wheel's runtime sources, or to Kiln's own kernels (kiln:...).
KERNEL_SOURCES = {
    "TypedMatMul<Eigen::half, Eigen::half, Eigen::half>": "xla/backends/cpu/runtime/dot_lib_f16.cc",
    "TypedMatMul<float, float, float>": "xla/backends/cpu/runtime/dot_lib_f32.cc",
    "TypedMatMul<double, double, double>": "xla/backends/cpu/runtime/dot_lib_f64.cc",
    "TypedMatMul<std::complex<float>, std::complex<float>, std::complex<float> >": "xla/backends/cpu/runtime/dot_lib_c64.cc",  # noqa: E501
    "TypedMatMul<std::complex<double>, std::complex<double>, std::complex<double> >": "xla/backends/cpu/runtime/dot_lib_c128.cc",  # noqa: E501
    "TypedMatMul<signed char, signed char, int>": "xla/backends/cpu/runtime/dot_lib_s8.cc",
    "TypedMatMul<int, int, int>": "xla/backends/cpu/runtime/dot_lib_s32.cc",
    "EigenConv2D<Eigen::half>": "xla/backends/cpu/runtime/convolution_lib_f16_2d.cc",
    "EigenConv3D<Eigen::half>": "xla/backends/cpu/runtime/convolution_lib_f16_3d.cc",
    "EigenConv2D<float>": "kiln:conv_f32.cc",
    "xla::cpu::SortInplace<": "xla/backends/cpu/runtime/sort_lib.cc",
}
# Kiln's own sources every shared runtime carries: the thread pool (see there why).
KILN_RUNTIME_SOURCES = ["kiln:thread_pool.cc"]
# A shim is compiled small: it runs once per call, and every bucket library carries a copy. Without
# assertions it is half the size; with its own sections, the linker drops what nothing calls. No
# unwind tables: an exception could not cross the C ABI into ctypes anyway (it would terminate).
SHIM_FLAGS = [
    "-Os",
    "-DNDEBUG",
    "-ffunction-sections",
    "-fdata-sections",
    "-fno-exceptions",
    "-fno-asynchronous-unwind-tables",
]
# Never built: the first is replaced by kiln:conv_f32.cc (see there why); XLA's AOT emitter takes
# no 3D convolutions, and the second does not build with the flags the others need.
REPLACED_SOURCES = {
    "xla/backends/cpu/runtime/convolution_lib_f32_2d.cc",
    "xla/backends/cpu/runtime/convolution_lib_f32_3d.cc",
}

EXPORTS_MAP = "{ global: kiln_*; local: *; };\n"


@dataclass(frozen=True)
class Toolchain:
    """Where TensorFlow's headers and runtime sources are, and how to compile for one target CPU."""

    tensorflow_dir: Path
    tensorflow_version: str
    target_cpu: str
    cxx: str = "g++"

    @classmethod
    def for_installed_tensorflow(cls, target_cpu: str) -> Toolchain:
        import tensorflow as tf

        return cls(Path(tf.__file__).parent, tf.__version__, target_cpu, os.environ.get("CXX", "g++"))

    @property
    def flags(self) -> list[str]:
        # One set of flags for every object: Eigen's templates must be compiled alike everywhere
        # they are instantiated.
        return [
            "-O3",
            *cpu_flags(self.target_cpu),
            "-fPIC",
            "-std=c++17",
            "-w",
            "-D_GLIBCXX_USE_CXX11_ABI=1",
            "-DEIGEN_USE_THREADS",
            f"-I{self.tensorflow_dir / 'include'}",
        ]

    @property
    def strip(self) -> list[str]:
        """Symbols are dropped unless KILN_KEEP_SYMBOLS=1 asks to keep them for a profiler."""
        return [] if os.environ.get("KILN_KEEP_SYMBOLS") == "1" else ["-s"]

    @property
    def sources_dir(self) -> Path:
        return self.tensorflow_dir / "xla_aot_runtime_src"

    @property
    def framework_library(self) -> Path:
        return self.tensorflow_dir / "libtensorflow_framework.so.2"

    def cache_dir(self) -> Path:
        compiler = subprocess.run([self.cxx, "--version"], capture_output=True, text=True).stdout
        key = hashlib.sha256("\n".join([self.tensorflow_version, compiler, *self.flags]).encode())
        return cache_root() / "aot-runtime" / f"tf-{self.tensorflow_version}-{key.hexdigest()[:16]}"

    def core_sources(self) -> list[str]:
        every = sorted(str(p.relative_to(self.sources_dir)) for p in self.sources_dir.rglob("*.cc"))
        kernels = set(KERNEL_SOURCES.values()) | REPLACED_SOURCES
        return [s for s in every if s not in kernels]

    def runtime_objects(self, kernels: list[str]) -> list[Path]:
        """The cached objects for the core, Kiln's own runtime sources and the named kernel sources,
        building what is missing."""
        wanted = self.core_sources() + KILN_RUNTIME_SOURCES + kernels
        cache = self.cache_dir()
        missing = sum(not self._object_path(source, cache)[1].exists() for source in wanted)
        # The first build takes minutes on 2 cores: a bar on a terminal shows it moving.
        with (
            ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool,
            steps(missing, "building the AOT runtime", "object") as bar,
        ):
            objects = []
            for target, built in pool.map(lambda s: self._cached_object(s, cache), wanted):
                objects.append(target)
                bar.update(built)
            return objects

    def _object_path(self, source: str, cache: Path) -> tuple[Path, Path]:
        """(the source file, its cached object)."""
        if source.startswith("kiln:"):  # our own sources change with Kiln: key them by content
            path = KILN_KERNELS / source.removeprefix("kiln:")
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            return path, cache / f"kiln__{path.stem}-{digest}.o"
        return self.sources_dir / source, cache / (source.replace("/", "__") + ".o")

    def _cached_object(self, source: str, cache: Path) -> tuple[Path, bool]:
        """The object of `source`, and whether it was built now."""
        path, target = self._object_path(source, cache)
        if target.exists():
            return target, False
        cache.mkdir(parents=True, exist_ok=True)
        with open(cache / f".{target.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.exists():
                self.compile_object(path, target)
        return target, True

    def compile_object(self, source: Path, target: Path, extra: Sequence[str] = ()) -> None:
        """Compile one C++ file with the common flags, then `extra` (which, coming later, wins over
        them); the object appears under its final name only when complete."""
        with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".o", delete=False) as tmp:
            pass
        try:
            run([self.cxx, "-c", *self.flags, *extra, str(source), "-o", tmp.name], f"compiling {source.name}")
            os.replace(tmp.name, target)
        finally:
            if os.path.exists(tmp.name):
                os.unlink(tmp.name)

    def kernels_called_by(self, objects: list[Path]) -> list[str]:
        """Kernel sources whose template the given objects leave undefined."""
        undefined = run(["nm", "-uC", *map(str, objects)], "listing undefined symbols")
        return sorted({source for symbol, source in KERNEL_SOURCES.items() if symbol in undefined})

    def runtime_key(self, kernels: list[str]) -> str:
        """The shared runtime library's key: TensorFlow version, compiler, flags and the kernels in it
        (Kiln's own by content), so equal keys mean interchangeable libraries."""
        digest = hashlib.sha256(self.cache_dir().name.encode())
        for source in KILN_RUNTIME_SOURCES + sorted(kernels):
            digest.update(f"\0{source}".encode())
            if source.startswith("kiln:"):
                digest.update((KILN_KERNELS / source.removeprefix("kiln:")).read_bytes())
        return f"tf{self.tensorflow_version}-{self.target_cpu}-{digest.hexdigest()[:16]}"

    def link_runtime(self, kernels: list[str]) -> Path:
        """The AOT runtime core and the given kernels as one shared library, named by runtime_key and
        built once per key (cached, this path); every bucket library of a servable links it, and
        runtime/runtime_library.py says where servables find it.

        Its soname is its file name, so a process loads one copy per key however many servables ship
        it; -Bsymbolic binds its own references inside it, so no other library interposes on them.
        """
        name = f"libkiln_runtime-{self.runtime_key(kernels)}.so"
        cached = self.cache_dir() / "shared" / name
        if not cached.exists():
            cached.parent.mkdir(parents=True, exist_ok=True)
            with open(cached.parent / f".{name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not cached.exists():
                    tmp = cached.with_name(f".{name}.{os.getpid()}.tmp")
                    run(
                        [
                            self.cxx,
                            "-shared",
                            "-o",
                            str(tmp),
                            *map(str, self.runtime_objects(kernels)),
                            str(self.framework_library),
                            f"-Wl,-soname,{name}",
                            "-Wl,-Bsymbolic",
                            "-Wl,--no-undefined",
                            *self.strip,
                        ],
                        f"linking {name}",
                    )
                    os.replace(tmp, cached)
        return cached

    def compile_shim(self, header: Path, cpp_class: str, work: Path) -> Path:
        """The kiln_* C functions over one generated class (shim.cc)."""
        work.mkdir(parents=True, exist_ok=True)
        shim = work / f"{cpp_class}_shim.o"
        self.compile_object(
            SHIM_SOURCE,
            shim,
            [*SHIM_FLAGS, f"-I{header.parent}", f'-DKILN_HEADER="{header.name}"', f"-DKILN_CLASS={cpp_class}"],
        )
        return shim

    def link_bucket(self, shim: Path, code: list[Path], shared: list[Path], out: Path) -> None:
        """Link one bucket's shim and generated code (no constants) against the servable's shared
        libraries (the runtime, the weights).

        The library holds only its own code: the shared ones are found beside it (rpath $ORIGIN). Only
        kiln_* is exported, so libraries of several buckets and models load side by side.
        """
        work = out.parent / f".{out.stem}-build"
        work.mkdir(parents=True, exist_ok=True)
        exports = work / "exports.map"
        exports.write_text(EXPORTS_MAP)
        run(
            [
                self.cxx,
                "-shared",
                "-o",
                str(out),
                str(shim),
                *map(str, code),
                *map(str, shared),
                str(self.framework_library),
                "-Wl,-rpath,$ORIGIN",
                f"-Wl,--version-script={exports}",
                "-Wl,--no-undefined",
                "-Wl,--as-needed",
                "-Wl,--gc-sections",
                # Segments unpadded: a page of padding between each would be most of a small library.
                "-Wl,-z,noseparate-code",
                *self.strip,
            ],
            f"linking {out.name}",
        )
        shutil.rmtree(work)


def run(command: list[str], what: str) -> str:
    """Run a build tool; a failure raises CompileError carrying the tool's own message."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-30:]
        raise CompileError(f"{what} failed:\n" + "\n".join(tail))
    return done.stdout
