"""Import time of each serving path against the floor (the interpreter plus numpy): a fresh process per
measure, paths interleaved round by round, median seconds of the whole process (start, imports, exit)
and of its imports alone (python -X importtime, the top-level modules' cumulative microseconds), and
the five modules each path spends most on beyond the floor.

    python load/import_floor.py [--rounds 7] [--out load/results]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, compile_bytecode, write_results

PATHS = {
    "floor (python + numpy)": "import numpy",
    "kiln predict / local cold start": "import runtime.cli, runtime.engines, runtime.engines.xla_aot, "
                                       "runtime.codecs.tfserving",
    "Lambda handler": "import handlers.aws_lambda",
    "kiln serve": "import runtime.cli, runtime.settings, runtime.app, handlers.local",
}


def measure(code: str) -> tuple[float, float, dict[str, int]]:
    """(process seconds, import seconds, self microseconds by top-level package) of one fresh process."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, capture_output=True,
                          text=True, check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    elapsed = time.perf_counter() - started
    total, packages = 0, {}
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, cumulative, name = line.removeprefix("import time:").split("|")
        if not name.startswith("  "):  # imported at top level: its cumulative time covers its imports
            total += int(cumulative)
        package = name.strip().split(".")[0]
        packages[package] = packages.get(package, 0) + int(own)
    return elapsed, total / 1e6, packages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "load" / "results")
    args = parser.parse_args()
    compile_bytecode()
    runs: dict[str, list[tuple[float, float, dict[str, int]]]] = {name: [] for name in PATHS}
    for _ in range(args.rounds + 1):  # the first round, uncounted, warms the page cache
        for name, code in PATHS.items():
            runs[name].append(measure(code))
    floor_packages = set(runs["floor (python + numpy)"][-1][2])
    results = {}
    for name, measured in runs.items():
        measured = measured[1:]
        packages: dict[str, list[int]] = {}
        for _, _, by_package in measured:
            for package, micros in by_package.items():
                packages.setdefault(package, []).append(micros)
        heaviest = sorted(((statistics.median(v) / 1e3, p) for p, v in packages.items() if p not in floor_packages),
                          reverse=True)[:5]
        results[name] = {"process_s": round(statistics.median(m[0] for m in measured), 3),
                         "imports_s": round(statistics.median(m[1] for m in measured), 3),
                         "heaviest_beyond_floor_ms": {p: round(ms, 1) for ms, p in heaviest}}
    floor = results["floor (python + numpy)"]
    for entry in results.values():
        entry["process_vs_floor"] = round(entry["process_s"] / floor["process_s"], 2)
    write_results("import_floor", {"rounds": args.rounds, "load_average": os.getloadavg()[0], "paths": results},
                  args.out)


if __name__ == "__main__":
    main()
