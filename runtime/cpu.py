"""What the host CPU can run: its architecture and its instruction-set features.

A servable's compiled code needs the features of the CPU it was compiled for; loading it on a CPU
without them would die of SIGILL on the first request, so the engine checks first.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

from runtime.errors import ServableError

ARCHITECTURE_OF_TRIPLE = {"x86_64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


@functools.cache
def host_features() -> frozenset[str]:
    """Feature flags as Linux names them in /proc/cpuinfo (avx2, fma, avx512f, ...)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def host_architecture() -> str:
    machine = platform.machine().lower()
    return ARCHITECTURE_OF_TRIPLE.get(machine, machine)


def check_target(triple: str, cpu: str, features: list[str]) -> None:
    """Raise ServableError naming what this machine lacks to run code compiled for the target."""
    wanted = ARCHITECTURE_OF_TRIPLE.get(triple.split("-")[0], triple.split("-")[0])
    if wanted != host_architecture():
        raise ServableError(f"servable was compiled for {triple} but this machine is {host_architecture()}")
    missing = sorted(set(features) - host_features())
    if missing:
        raise ServableError(
            f"servable was compiled for CPU '{cpu}', which needs CPU features this machine lacks: "
            f"{', '.join(missing)}; recompile with a lower --target-cpu (for example x86-64-v3)"
        )
