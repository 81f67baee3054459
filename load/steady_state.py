"""Steady state: predictions per second per bucket for Kiln's AOT engine, TensorFlow's graph
execution and TensorFlow with XLA JIT, on the same inputs in the same process. Rounds alternate
between the three so that a noisy neighbour slows them alike; each figure is a median of rounds.

    python load/steady_state.py [--models digits,mobilenet_v2] [--rounds 5] [--seconds 0.4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import ROOT, example_servables, pyplot, write_results


def rate(call, rows: int, seconds: float) -> float:
    call()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        call()
        calls += 1
    return calls * rows / elapsed


def measure(example, rounds: int, seconds: float) -> dict:
    import numpy as np
    import tensorflow as tf

    from runtime.engines import open_servable

    engine = open_servable(example.servable)
    graph = tf.saved_model.load(str(example.saved_model)).signatures["serving_default"]
    jit = tf.function(lambda **kwargs: graph(**kwargs), jit_compile=True)
    signature = engine.signature("serving_default")
    rng = np.random.default_rng(0)
    per_bucket = {}
    for bucket in engine.manifest.batch_sizes:
        inputs = {s.name: rng.random((bucket, *s.shape[1:])).astype(s.dtype) for s in signature.inputs}
        tensors = {name: tf.constant(value) for name, value in inputs.items()}
        runners = {"kiln_aot": lambda: engine.run("serving_default", inputs),
                   "tensorflow_graph": lambda: graph(**tensors),
                   "tensorflow_xla_jit": lambda: jit(**tensors)}
        samples = {name: [] for name in runners}
        for _ in range(rounds):
            for name, call in runners.items():
                samples[name].append(rate(call, bucket, seconds))
        row = {f"{name}_per_second": statistics.median(values) for name, values in samples.items()}
        row["aot_vs_graph"] = row["kiln_aot_per_second"] / row["tensorflow_graph_per_second"]
        row["aot_vs_jit"] = row["kiln_aot_per_second"] / row["tensorflow_xla_jit_per_second"]
        per_bucket[str(bucket)] = row
        print(example.name, bucket, {k: round(v, 2) for k, v in row.items()}, flush=True)
    engine.close()
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
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, (name, buckets) in zip(axes[0], models.items()):
        sizes = [int(b) for b in buckets]
        for key, label in (("kiln_aot", "Kiln XLA AOT"), ("tensorflow_graph", "TensorFlow graph"),
                           ("tensorflow_xla_jit", "TensorFlow XLA JIT")):
            ax.plot(sizes, [buckets[str(b)][f"{key}_per_second"] for b in sizes], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (bucket)")
        ax.set_ylabel("predictions per second")
        ax.set_title(name)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
