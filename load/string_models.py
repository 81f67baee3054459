"""String signatures (issue 17): Kiln's host front + AOT remainder against TensorFlow, side by side.

Cold start: a fresh process to its first prediction on a tf.Example/string signature, Kiln (no
TensorFlow) against `import tensorflow` + `tf.saved_model.load` + first call, runs interleaved,
medians; and the same for wide_deep compiled with --engine saved-model (the fallback, which imports
TensorFlow itself). Throughput: batch-32 calls per second in one process, Kiln's engine against the loaded
SavedModel's signature (a TensorFlow graph function), alternating rounds, the median of the
rounds' ratios; the 32 rows differ (items in and out of the vocabulary, queries, dense values).

    python load/string_models.py [--runs 5] [--seconds 2] [--out load/results]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, example_servables, write_results

CASES = {"wide_deep:serving_default": ("wide_deep", "serving_default"),
         "wide_deep:examples": ("wide_deep", "examples"),
         "half_plus_two:regress_x_to_y": ("half_plus_two", "regress_x_to_y")}


def case_inputs(case: str, rows: int) -> dict:
    """A request's inputs for the case: `rows` rows of strings or serialized tf.Examples, different
    from row to row (items in and out of the vocabulary, queries, dense values), seeded."""
    import numpy as np

    from runtime.codecs.examples import serialize

    rng = np.random.default_rng(17)
    items = [f"item_{i:04d}" for i in rng.integers(0, 600, rows)]  # 500 in the vocabulary
    queries = [f"query {i} {'é' * int(i % 3)}" for i in rng.integers(0, 1000, rows)]
    dense = rng.normal(size=(rows, 4)).astype(np.float32)
    if case == "wide_deep:serving_default":
        return {"item": np.array([i.encode() for i in items], dtype=object),
                "query": np.array([q.encode() for q in queries], dtype=object), "dense": dense}
    if case == "wide_deep:examples":
        return {"examples": serialize([{"item": i, "query": q, "dense": d.tolist()}
                                       for i, q, d in zip(items, queries, dense)])}
    return {"inputs": serialize([{"x": float(x)} for x in rng.normal(size=rows)])}


PRELUDE = """
import sys, time
sys.path.insert(0, "load")
from string_models import case_inputs
inputs = case_inputs(sys.argv[3], 1)
"""
KILN = PRELUDE + """
from runtime.engines import open_servable
engine = open_servable(sys.argv[1])
engine.run(sys.argv[2], inputs)
assert ("tensorflow" in sys.modules) == (engine.signature(sys.argv[2]).engine == "saved-model")
"""
TENSORFLOW = PRELUDE + """
import tensorflow as tf
function = tf.saved_model.load(sys.argv[1]).signatures[sys.argv[2]]
function(**{name: tf.constant(value.tolist() if value.dtype == object else value) for name, value in inputs.items()})
"""


def cold_start(code: str, *args: str) -> float:
    """Wall seconds from starting the process to its exit right after the first prediction."""
    begun = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if done.returncode != 0:
        raise SystemExit(f"cold start child failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - begun


def throughput(engine, function, key: str, inputs: dict, seconds: float, rounds: int) -> dict:
    """Calls per second of each, in alternating rounds of `seconds` (who goes first alternates too),
    and the median over the rounds of Kiln's rate over TensorFlow's in the same round."""
    import tensorflow as tf

    feeds = {name: tf.constant(value.tolist() if value.dtype == object else value) for name, value in inputs.items()}
    calls = {"kiln": lambda: engine.run(key, inputs), "tensorflow": lambda: function(**feeds)}
    rates: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call()  # warm
    for round_ in range(rounds):
        for name in sorted(calls, reverse=bool(round_ % 2)):
            call, count, begun = calls[name], 0, time.perf_counter()
            while time.perf_counter() - begun < seconds:
                call()
                count += 1
            rates[name].append(count / (time.perf_counter() - begun))
    ratios = [k / t for k, t in zip(rates["kiln"], rates["tensorflow"])]
    return {"kiln_calls_per_s": round(statistics.median(rates["kiln"]), 1),
            "tensorflow_calls_per_s": round(statistics.median(rates["tensorflow"]), 1),
            "ratio": round(statistics.median(ratios), 2), "ratios": [round(r, 2) for r in ratios]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=ROOT / "load" / "results")
    args = parser.parse_args()
    repository = Path(tempfile.mkdtemp(prefix="kiln-strings-"))
    built = example_servables(repository, ["wide_deep", "half_plus_two"])
    fallback = repository / "wide_deep_saved_model" / "1"
    subprocess.run([sys.executable, "-m", "runtime.cli", "compile", str(built["wide_deep"].saved_model), str(fallback),
                    "--engine", "saved-model", "--batch-sizes", "1,32"], cwd=ROOT, check=True, capture_output=True)
    results: dict = {"cold_start": {}, "throughput_batch_32": {}}
    runs = {case: (built[model].servable, built[model].saved_model, key, case) for case, (model, key) in CASES.items()}
    runs["wide_deep:serving_default (saved-model engine)"] = (fallback, built["wide_deep"].saved_model, "serving_default",
                                                              "wide_deep:serving_default")
    for case, (servable, saved_model, key, inputs) in runs.items():
        times: dict[str, list[float]] = {"kiln": [], "tensorflow": []}
        for _ in range(args.runs):  # interleaved: the machine's noise falls on both alike
            times["kiln"].append(cold_start(KILN, str(servable), key, inputs))
            times["tensorflow"].append(cold_start(TENSORFLOW, str(saved_model), key, inputs))
        kiln, tensorflow = statistics.median(times["kiln"]), statistics.median(times["tensorflow"])
        results["cold_start"][case] = {"kiln_s": round(kiln, 3), "tensorflow_s": round(tensorflow, 3),
                                       "speedup": round(tensorflow / kiln, 2),
                                       "runs": {k: [round(t, 3) for t in v] for k, v in times.items()}}
        print(json.dumps({case: results["cold_start"][case]}), flush=True)

    import tensorflow as tf

    from runtime.engines import open_servable

    for case, (model, key) in CASES.items():
        engine = open_servable(built[model].servable)
        function = tf.saved_model.load(str(built[model].saved_model)).signatures[key]
        batch = case_inputs(case, 32)
        results["throughput_batch_32"][case] = throughput(engine, function, key, batch, args.seconds, args.runs)
        engine.close()
        print(json.dumps({case: results["throughput_batch_32"][case]}), flush=True)
    write_results("string_models", results, args.out)


if __name__ == "__main__":
    main()
