"""Steady state: predictions per second per bucket for Kiln's AOT engine, TensorFlow's graph
execution and TensorFlow with XLA JIT, on the same inputs in the same process. Rounds alternate
between the three so that a noisy neighbour slows them alike; each figure is a median of rounds.

Two regimes, each for all three runners: one caller (the latency a lone batch sees, every core
available to intra-op parallelism), and saturated (one caller per core, as a server running one
batch per core does; Kiln's engine then runs each batch on one thread).

    python load/steady_state.py [--models digits,mobilenet_v2] [--rounds 5] [--seconds 0.4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import ROOT, example_servables, pyplot, write_results


def rate(call, rows: int, seconds: float, callers: int = 1) -> float:
    """Rows per second with `callers` threads calling at once for about `seconds`."""
    call()
    counts = [0] * callers
    start = time.perf_counter()

    def loop(index: int) -> None:
        while time.perf_counter() - start < seconds:
            call()
            counts[index] += 1

    with ThreadPoolExecutor(callers) as pool:
        list(pool.map(loop, range(callers)))
    return sum(counts) * rows / (time.perf_counter() - start)


def measure(example, rounds: int, seconds: float) -> dict:
    import numpy as np
    import tensorflow as tf

    from runtime.engines import open_servable

    cores = len(os.sched_getaffinity(0))
    engine = open_servable(example.servable)
    single_threaded = open_servable(example.servable, threads=1)
    loaded = tf.saved_model.load(str(example.saved_model))  # keeps the variables alive
    graph = loaded.signatures["serving_default"]
    jit = tf.function(lambda **kwargs: graph(**kwargs), jit_compile=True)
    signature = engine.signature("serving_default")
    rng = np.random.default_rng(0)
    per_bucket = {}
    for bucket in engine.manifest.batch_sizes:
        inputs = {s.name: rng.random((bucket, *s.shape[1:])).astype(s.dtype) for s in signature.inputs}
        tensors = {name: tf.constant(value) for name, value in inputs.items()}
        runners = {  # name: (call, callers)
            "kiln_aot": (lambda: engine.run("serving_default", inputs), 1),
            "tensorflow_graph": (lambda: graph(**tensors), 1),
            "tensorflow_xla_jit": (lambda: jit(**tensors), 1),
            "saturated_kiln_aot": (lambda: single_threaded.run("serving_default", inputs), cores),
            "saturated_tensorflow_graph": (lambda: graph(**tensors), cores),
            "saturated_tensorflow_xla_jit": (lambda: jit(**tensors), cores),
        }
        samples = {name: [] for name in runners}
        for _ in range(rounds):
            for name, (call, callers) in runners.items():
                samples[name].append(rate(call, bucket, seconds, callers))
        row = {f"{name}_per_second": statistics.median(values) for name, values in samples.items()}
        for prefix in ("", "saturated_"):
            aot = row[f"{prefix}kiln_aot_per_second"]
            row[f"{prefix}aot_vs_graph"] = aot / row[f"{prefix}tensorflow_graph_per_second"]
            row[f"{prefix}aot_vs_jit"] = aot / row[f"{prefix}tensorflow_xla_jit_per_second"]
        per_bucket[str(bucket)] = row
        print(example.name, bucket, {k: round(v, 2) for k, v in row.items()}, flush=True)
    engine.close()
    single_threaded.close()
    return per_bucket


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,mobilenet_v2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.4)
    parser.add_argument("--out", type=Path, default=ROOT / "load" / "results")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    examples = example_servables(Path(tempfile.mkdtemp(prefix="kiln-steady-")), args.models.split(","))
    results = {"threads": os.cpu_count(), "rounds": args.rounds,
               "models": {name: measure(example, args.rounds, args.seconds) for name, example in examples.items()}}
    write_results("steady_state", results, args.out)
    plot(results, args.out / "steady_state.png")


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    models = results["models"]
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8), squeeze=False)
    for column, (name, buckets) in enumerate(models.items()):
        sizes = [int(b) for b in buckets]
        for ax, prefix, regime in ((axes[0][column], "", "one caller"),
                                   (axes[1][column], "saturated_", "one caller per core")):
            for key, label in (("kiln_aot", "Kiln XLA AOT"), ("tensorflow_graph", "TensorFlow graph"),
                               ("tensorflow_xla_jit", "TensorFlow XLA JIT")):
                ax.plot(sizes, [buckets[str(b)][f"{prefix}{key}_per_second"] for b in sizes], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size (bucket)")
            ax.set_ylabel("predictions per second")
            ax.set_title(f"{name}, {regime}")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
