"""The examples' aarch64 (Graviton) builds, run under QEMU user-mode emulation, against TensorFlow on
this x86 machine: every xla-aot signature at every bucket (tests/test_graviton.py runs a subset).

    python load/graviton_parity.py [--models digits,half_plus_two,mobilenet_v2,tiny_lm]
                                   [--batch-sizes 1,2,4,8,16,32] [--target-cpu neoverse-n1]

Prints JSON: for each example, signature and bucket, the largest absolute difference from
TensorFlow's outputs, and the seconds the emulated run took (emulation, not Arm's speed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from examples.build import DEFAULT_BATCH_SIZES, SOURCES, Example, build_examples  # noqa: E402
from runtime.progress import say  # noqa: E402

TOLERANCE = 1e-5


def build_for(examples: dict[str, Example], out: Path, cpus, buckets=DEFAULT_BATCH_SIZES) -> dict[str, Example]:
    """The examples' SavedModels compiled for `cpus` (one per architecture) into OUT/NAME/1."""
    import importlib

    from runtime.compiler.compile import compile_servable

    built = {}
    for name, example in examples.items():
        options = getattr(importlib.import_module(f"examples.{name}"), "COMPILE_OPTIONS", {})
        servable = out / name / "1"
        compile_servable(example.saved_model, servable, batch_sizes=tuple(buckets), target_cpu=list(cpus),
                         log=lambda message: say(f"{name}: {message}"), **options)
        built[name] = Example(name, example.saved_model, servable)
    return built


def random_inputs(signature, bucket: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs filling one bucket: floats in [0, 1), integers (token ids, positions, counts) in [1, 4)."""
    inputs = {}
    for spec in signature.inputs:
        shape = (bucket,) if signature.elementwise else tuple(bucket if d is None else d for d in spec.shape)
        if np.dtype(spec.dtype).kind in "iu":
            inputs[spec.name] = rng.integers(1, 4, shape).astype(spec.dtype)
        else:
            inputs[spec.name] = rng.random(shape).astype(spec.dtype)
    return inputs


def compare(example: Example, buckets, architecture: str = "aarch64", seed: int = 0) -> list[dict]:
    """Each xla-aot signature of the example at each bucket: its emulated outputs against
    TensorFlow's on the same inputs, one emulated process per bucket. Signatures with a host front
    (tf.Example parsing, lookups: runtime/host_program.py, Python on every machine) are left out:
    random inputs are no tf.Examples, and their compiled remainder is code like any other."""
    import tensorflow as tf

    from runtime.compiler.emulate import run_emulated
    from runtime.manifest import read_manifest

    manifest = read_manifest(example.servable)
    loaded = tf.saved_model.load(str(example.saved_model))
    rng = np.random.default_rng(seed)
    keys = [key for key, sig in manifest.signatures.items() if sig.engine == "xla-aot" and sig.host is None]
    rows = []
    for bucket in buckets:
        calls = [(key, bucket, random_inputs(manifest.signatures[key], bucket, rng)) for key in keys]
        started = time.perf_counter()
        emulated = run_emulated(example.servable, manifest, architecture, calls)
        seconds = time.perf_counter() - started
        for (key, _, inputs), ours in zip(calls, emulated):
            theirs = {name: value.numpy() for name, value in
                      loaded.signatures[key](**{name: tf.constant(a) for name, a in inputs.items()}).items()}
            assert set(ours) == set(theirs), (key, sorted(ours), sorted(theirs))
            diff = max(float(np.abs(ours[name].astype(np.float64) - theirs[name]).max()) for name in ours)
            rows.append({"example": example.name, "signature": key, "bucket": bucket, "max_abs_diff": diff,
                         "emulated_seconds": round(seconds, 2)})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(SOURCES))
    parser.add_argument("--batch-sizes", default=",".join(map(str, DEFAULT_BATCH_SIZES)))
    parser.add_argument("--target-cpu", default="neoverse-n1", help="an aarch64 CPU (runtime/compiler/target.py)")
    args = parser.parse_args(argv)
    buckets = [int(size) for size in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as out:
        native = build_examples(Path(out) / "native", args.models.split(","), log=say)
        started = time.perf_counter()
        examples = build_for(native, Path(out) / "aarch64", [args.target_cpu], buckets)
        built = time.perf_counter() - started
        rows = [row for example in examples.values() for row in compare(example, buckets)]
    print(json.dumps({"target_cpu": args.target_cpu, "build_seconds": round(built, 1),
                      "emulated_seconds": round(sum({(r["example"], r["bucket"]): r["emulated_seconds"]
                                                     for r in rows}.values()), 1),
                      "worst": max(r["max_abs_diff"] for r in rows), "within_tolerance":
                      all(r["max_abs_diff"] <= TOLERANCE for r in rows), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
