"""Cold start: a fresh process to its first prediction, Kiln's thin runtime against TensorFlow
(`import tensorflow` + `tf.saved_model.load` + first call), median of N runs, with peak RSS.

    python load/coldstart.py [--runs 5] [--models digits,mobilenet_v2] [--out load/results]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, compile_bytecode, example_servables, pyplot, write_results

# Each child prints one line when its first prediction is done: "<peak RSS in KiB>", read from
# VmHWM (getrusage's ru_maxrss would carry the parent's peak over a fork).
THIN = """
import sys
import numpy as np
from runtime.engines import open_servable
engine = open_servable(sys.argv[1])
spec = engine.signature("serving_default").inputs[0]
engine.run("serving_default", {spec.name: np.zeros((1, *spec.shape[1:]), spec.dtype)})
print(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")), flush=True)
"""
TENSORFLOW = """
import sys
import numpy as np
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
function = loaded.signatures["serving_default"]
name, spec = next(iter(function.structured_input_signature[1].items()))
function(**{name: tf.zeros((1, *spec.shape[1:]), spec.dtype)})
print(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")), flush=True)
"""


def first_prediction(code: str, path: Path) -> tuple[float, int]:
    """Seconds from spawning the interpreter to the child's line, and the child's peak RSS (KiB)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
    line = child.stdout.readline()
    elapsed = time.perf_counter() - start
    if child.wait() != 0 or not line.strip():
        raise RuntimeError(f"cold start child failed for {path}")
    return elapsed, int(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--models", default="digits,mobilenet_v2")
    parser.add_argument("--out", type=Path, default=ROOT / "load" / "results")
    args = parser.parse_args()
    compile_bytecode()
    examples = example_servables(Path(tempfile.mkdtemp(prefix="kiln-coldstart-")), args.models.split(","))
    results = {"runs": args.runs, "models": {}}
    for name, example in examples.items():
        thin, tf = [], []
        for _ in range(args.runs):  # interleaved, so drift on a shared machine hits both alike
            thin.append(first_prediction(THIN, example.servable))
            tf.append(first_prediction(TENSORFLOW, example.saved_model))
        row = {
            "kiln_seconds": statistics.median(t for t, _ in thin),
            "tensorflow_seconds": statistics.median(t for t, _ in tf),
            "kiln_peak_rss_mb": max(r for _, r in thin) / 1024,
            "tensorflow_peak_rss_mb": max(r for _, r in tf) / 1024,
        }
        row["speedup"] = row["tensorflow_seconds"] / row["kiln_seconds"]
        row["rss_ratio"] = row["kiln_peak_rss_mb"] / row["tensorflow_peak_rss_mb"]
        results["models"][name] = row
    write_results("coldstart", results, args.out)
    plot(results, args.out / "coldstart.png")


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    names = list(results["models"])
    fig, (time_ax, rss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((time_ax, "seconds", "first prediction (s)"), (rss_ax, "peak_rss_mb", "peak RSS (MB)")):
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [results["models"][n][f"kiln_{key}"] for n in names], 0.4, label="Kiln thin runtime")
        ax.bar([x + 0.2 for x in xs], [results["models"][n][f"tensorflow_{key}"] for n in names], 0.4, label="TensorFlow")
        ax.set_xticks(list(xs), names)
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"Cold start, fresh process to first prediction (median of {results['runs']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
