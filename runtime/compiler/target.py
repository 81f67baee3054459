"""The target CPU a servable is compiled for, and the instruction-set features its code needs.

Both compilers in a build (LLVM inside XLA for the model, g++ for the Eigen kernels) get the same
CPU. "native" means the best x86-64 microarchitecture level (v2, v3, v4) this machine has: both
compilers know those names, and they name a portable feature set rather than one chip. The aarch64
names (AARCH64_CPUS: Graviton 2, 3 and 4, or any Armv8-A) select triple aarch64-unknown-linux-gnu.
"""

from __future__ import annotations

import os
import subprocess

from runtime.cpu import host_architecture, host_features
from runtime.errors import CompileError
from runtime.manifest import Target

TRIPLE = "x86_64-pc-linux"
AARCH64_TRIPLE = "aarch64-unknown-linux-gnu"
# --target-cpu: (the CPU as LLVM names it, g++'s flags for the same CPU). Debian 12's g++ 12 predates
# -mcpu=neoverse-v2, so that one is spelled as its architecture (Armv9-A with I8MM and BF16) and tuning.
AARCH64_CPUS = {
    "aarch64-generic": ("generic", ["-march=armv8-a"]),
    "neoverse-n1": ("neoverse-n1", ["-mcpu=neoverse-n1"]),  # Graviton 2
    "neoverse-v1": ("neoverse-v1", ["-mcpu=neoverse-v1"]),  # Graviton 3
    "neoverse-v2": ("neoverse-v2", ["-march=armv9-a+i8mm+bf16", "-mtune=neoverse-n2"]),  # Graviton 4
}

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

AARCH64_MACRO_TO_CPUINFO = {
    "__ARM_NEON": "asimd",
    "__ARM_FEATURE_CRC32": "crc32",
    "__ARM_FEATURE_ATOMICS": "atomics",
    "__ARM_FEATURE_DOTPROD": "asimddp",
    "__ARM_FEATURE_FP16_VECTOR_ARITHMETIC": "asimdhp",
    "__ARM_FEATURE_QRDMX": "asimdrdm",
    "__ARM_FEATURE_COMPLEX": "fcma",
    "__ARM_FEATURE_JCVT": "jscvt",
    "__ARM_FEATURE_FRINT": "frint",
    "__ARM_FEATURE_SVE": "sve",
    "__ARM_FEATURE_SVE2": "sve2",
    "__ARM_FEATURE_BF16_VECTOR_ARITHMETIC": "bf16",
    "__ARM_FEATURE_MATMUL_INT8": "i8mm",
    "__ARM_FEATURE_SVE_MATMUL_INT8": "svei8mm",
    "__ARM_FEATURE_RNG": "rng",
}

LEVELS = {
    "x86-64-v4": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
    "x86-64-v3": {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"},
    "x86-64-v2": {"sse4_2", "ssse3", "popcnt"},
}


def resolve_target(cpu: str = "native", cxx: str = "g++") -> Target:
    """A Target for the named CPU ("native", an x86-64 level, an AARCH64_CPUS name, or a name g++ and
    LLVM both know). `cxx` is the host's compiler; an aarch64 CPU is asked of the cross compiler."""
    if cpu == "native" and host_architecture() == "aarch64":
        cpu = "aarch64-generic"
    elif cpu == "native":
        have = host_features()
        cpu = next((level for level, needs in LEVELS.items() if needs <= have), "x86-64")
    if cpu in AARCH64_CPUS:
        return Target(triple=AARCH64_TRIPLE, cpu=cpu, features=tuple(features_of(cpu, cross_compiler("aarch64"))))
    return Target(triple=TRIPLE, cpu=cpu, features=tuple(features_of(cpu, cxx)))


def llvm_cpu(cpu: str) -> str:
    """The CPU's name for tfcompile (LLVM)."""
    return AARCH64_CPUS[cpu][0] if cpu in AARCH64_CPUS else cpu


def cpu_flags(cpu: str) -> list[str]:
    """g++'s flags selecting the CPU."""
    return list(AARCH64_CPUS[cpu][1]) if cpu in AARCH64_CPUS else [f"-march={cpu}"]


def features_of(cpu: str, cxx: str = "g++") -> list[str]:
    """The cpuinfo features code compiled for CPU may use, as g++ reports them."""
    try:
        done = subprocess.run(
            [cxx, *cpu_flags(cpu), "-dM", "-E", "-x", "c++", "-"], input="", capture_output=True, text=True
        )
    except FileNotFoundError:
        raise CompileError(f"--target-cpu '{cpu}' needs the compiler {cxx}, which is not installed") from None
    if done.returncode != 0:
        raise CompileError(f"unknown --target-cpu '{cpu}': {done.stderr.strip().splitlines()[0]}")
    macros = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("#define ")}
    table = AARCH64_MACRO_TO_CPUINFO if cpu in AARCH64_CPUS else MACRO_TO_CPUINFO
    return sorted(name for macro, name in table.items() if macro in macros)


# Architecture -> Debian's cross compiler for it.
CROSS_COMPILERS = {"aarch64": "aarch64-linux-gnu-g++"}


def cross_compiler(architecture: str) -> str:
    """The C++ compiler that builds for `architecture` on this machine."""
    if architecture == host_architecture():
        return os.environ.get("CXX", "g++")
    if architecture not in CROSS_COMPILERS:
        raise CompileError(f"Kiln cannot build for {architecture} on {host_architecture()}")
    return CROSS_COMPILERS[architecture]
