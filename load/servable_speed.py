"""AOT speed of one model in two servables side by side (a format change's before and after, say):
predictions per second at each bucket, rounds alternating between the two in one process so that
a noisy neighbour slows both alike; medians, and after/before ratios.

    python load/servable_speed.py BEFORE_SERVABLE AFTER_SERVABLE [--rounds 7] [--seconds 0.3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from common import ROOT, write_results


def rate(engine, key: str, inputs: dict, rows: int, seconds: float) -> float:
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        engine.run(key, inputs)
        calls += 1
    return calls * rows / elapsed


def main() -> None:
    from runtime.engines import open_servable

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--signature", default="serving_default")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.3)
    parser.add_argument("--out", type=Path, default=ROOT / "load" / "results")
    args = parser.parse_args()
    engines = {"before": open_servable(args.before), "after": open_servable(args.after)}
    signature = engines["after"].signature(args.signature)
    rng = np.random.default_rng(0)
    results = []
    for bucket in engines["after"].manifest.batch_sizes:
        inputs = {spec.name: rng.random((bucket, *spec.shape[1:])).astype(spec.dtype) for spec in signature.inputs}
        rates: dict[str, list[float]] = {name: [] for name in engines}
        for name, engine in engines.items():
            engine.run(args.signature, inputs)  # first call: page faults
        for _ in range(args.rounds):
            for name, engine in engines.items():
                rates[name].append(rate(engine, args.signature, inputs, bucket, args.seconds))
        medians = {name: statistics.median(values) for name, values in rates.items()}
        results.append({"bucket": bucket, **{f"{name}_per_s": round(value, 1) for name, value in medians.items()},
                        "after_over_before": round(medians["after"] / medians["before"], 3)})
    for engine in engines.values():
        engine.close()
    write_results("servable_speed", {"before": str(args.before), "after": str(args.after), "buckets": results},
                  args.out)


if __name__ == "__main__":
    main()
