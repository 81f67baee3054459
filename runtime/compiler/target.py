"""The target CPU a servable is compiled for, and the instruction-set features its code needs.

Both compilers in a build (LLVM inside XLA for the model, g++ for the Eigen kernels) get the same
CPU name. "native" means the best x86-64 microarchitecture level (v2, v3, v4) this machine has: both
compilers know those names, and they name a portable feature set rather than one chip.
"""

from __future__ import annotations

import subprocess

from runtime.cpu import host_features
from runtime.errors import CompileError
from runtime.manifest import Target

TRIPLE = "x86_64-pc-linux"

# Feature macros g++ defines for a -march, and the name /proc/cpuinfo gives the same feature.
MACRO_TO_CPUINFO = {
    "__SSE3__": "pni",
    "__SSSE3__": "ssse3",
    "__SSE4_1__": "sse4_1",
    "__SSE4_2__": "sse4_2",
    "__POPCNT__": "popcnt",
    "__AVX__": "avx",
    "__AVX2__": "avx2",
    "__FMA__": "fma",
    "__F16C__": "f16c",
    "__BMI__": "bmi1",
    "__BMI2__": "bmi2",
    "__LZCNT__": "abm",
    "__MOVBE__": "movbe",
    "__AVX512F__": "avx512f",
    "__AVX512CD__": "avx512cd",
    "__AVX512BW__": "avx512bw",
    "__AVX512DQ__": "avx512dq",
    "__AVX512VL__": "avx512vl",
    "__AVX512VNNI__": "avx512_vnni",
    "__AVX512BF16__": "avx512_bf16",
    "__AVX512IFMA__": "avx512ifma",
    "__AVX512VBMI__": "avx512vbmi",
    "__AVX512VBMI2__": "avx512_vbmi2",
    "__AVX512BITALG__": "avx512_bitalg",
    "__AVX512VPOPCNTDQ__": "avx512_vpopcntdq",
    "__AVXVNNI__": "avx_vnni",
    "__GFNI__": "gfni",
    "__VAES__": "vaes",
    "__VPCLMULQDQ__": "vpclmulqdq",
    "__FMA4__": "fma4",
    "__XOP__": "xop",
}

LEVELS = {
    "x86-64-v4": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
    "x86-64-v3": {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"},
    "x86-64-v2": {"sse4_2", "ssse3", "popcnt"},
}


def resolve_target(cpu: str = "native", cxx: str = "g++") -> Target:
    """A Target for the named CPU ("native", an x86-64 level, or a name g++ and LLVM both know)."""
    if cpu == "native":
        have = host_features()
        cpu = next((level for level, needs in LEVELS.items() if needs <= have), "x86-64")
    return Target(triple=TRIPLE, cpu=cpu, features=tuple(features_of(cpu, cxx)))


def features_of(cpu: str, cxx: str = "g++") -> list[str]:
    """The cpuinfo features code compiled with -march=CPU may use, as g++ reports them."""
    done = subprocess.run(
        [cxx, f"-march={cpu}", "-dM", "-E", "-x", "c++", "-"], input="", capture_output=True, text=True
    )
    if done.returncode != 0:
        raise CompileError(f"unknown --target-cpu '{cpu}': {done.stderr.strip().splitlines()[0]}")
    macros = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("#define ")}
    return sorted(name for macro, name in MACRO_TO_CPUINFO.items() if macro in macros)
