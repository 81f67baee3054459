"""Servable bytes against SavedModel bytes, per model: what every cold start downloads, hashes and pages
in, against what the model weighs as TensorFlow saves it. The examples come from the build cache;
Keras applications (ResNet50, EfficientNetB0, weights=None, seeded, batch norm calibrated as
examples/mobilenet_v2.py does), a BERT-style encoder and a bidirectional LSTM are built here and
compiled at --batch-sizes (default 1,8: the big ones take minutes per bucket on 2 cores).

    python load/servable_size.py [--examples digits,half_plus_two,mobilenet_v2,tiny_lm,wide_deep]
                                 [--keras resnet50,efficientnetb0,encoder,lstm] [--batch-sizes 1,8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import ROOT, example_servables, write_results


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def breakdown(servable: Path) -> dict:
    """Bytes of the servable by part: the runtime (in it, or shared: found by its key), the weights,
    the bucket libraries, the rest."""
    from runtime.manifest import read_manifest

    manifest = read_manifest(servable)
    shared = {manifest.runtime.file if manifest.runtime else None: "runtime", manifest.weights: "weights"}
    parts = {"runtime": 0, "weights": 0, "buckets": 0, "other": 0}
    for name, entry in manifest.files.items():
        part = shared.get(name) or ("buckets" if name.startswith("lib/") else "other")
        parts[part] += entry.size
    if manifest.runtime and not manifest.runtime.embedded:
        parts["runtime"] = manifest.runtime.size
    return {"format": manifest.format_version, "batch_sizes": list(manifest.batch_sizes),
            "runtime_embedded": bool(manifest.runtime and manifest.runtime.embedded), **parts}


def measure(name: str, saved_model: Path, servable: Path) -> dict:
    """`ratio`: the servable as format 3 stores it, its runtime shared (once per store and install);
    `ratio_embedded`: with the runtime in it (--embed-runtime, format 2). The bucket libraries are
    the same either way, so one servable gives both."""
    saved, parts = directory_bytes(saved_model), breakdown(servable)
    total = directory_bytes(servable)
    alone = total - parts["runtime"] if parts["runtime_embedded"] else total
    return {"model": name, "saved_model_bytes": saved, "servable_bytes": alone,
            "ratio": round(alone / saved, 3), "ratio_embedded": round((alone + parts["runtime"]) / saved, 3), **parts}


def keras_model(name: str):
    import keras
    import numpy as np

    from examples.mobilenet_v2 import calibrate_batch_norm

    keras.utils.set_random_seed(0)
    if name in ("resnet50", "efficientnetb0"):
        build = {"resnet50": keras.applications.ResNet50, "efficientnetb0": keras.applications.EfficientNetB0}[name]
        model = build(weights=None, classes=1000, input_shape=(224, 224, 3))
        calibrate_batch_norm(model, np.random.default_rng(0).uniform(-1, 1, (4, 224, 224, 3)).astype(np.float32))
        return model, (224, 224, 3)
    if name == "encoder":  # BERT-style: 4 layers, width 256, 4 heads, 128 tokens of 256-wide features
        inputs = keras.Input((128, 256))
        x = inputs
        for _ in range(4):
            attended = keras.layers.MultiHeadAttention(4, 64)(x, x)
            x = keras.layers.LayerNormalization()(x + attended)
            hidden = keras.layers.Dense(1024, activation="gelu")(x)
            x = keras.layers.LayerNormalization()(x + keras.layers.Dense(256)(hidden))
        return keras.Model(inputs, keras.layers.Dense(2)(x[:, 0])), (128, 256)
    if name == "lstm":  # two bidirectional LSTM layers over 64 steps of 128 features
        inputs = keras.Input((64, 128))
        x = keras.layers.Bidirectional(keras.layers.LSTM(256, return_sequences=True))(inputs)
        x = keras.layers.Bidirectional(keras.layers.LSTM(256))(x)
        return keras.Model(inputs, keras.layers.Dense(10)(x)), (64, 128)
    raise SystemExit(f"unknown model {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", default="digits,half_plus_two,mobilenet_v2,tiny_lm,wide_deep")
    parser.add_argument("--keras", default="")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--out", type=Path, default=ROOT / "load" / "results")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    rows = []
    with tempfile.TemporaryDirectory(prefix="kiln-size-") as work:
        work = Path(work)
        examples = [name for name in args.examples.split(",") if name]
        for name, example in example_servables(work / "examples", examples).items():
            rows.append(measure(name, example.saved_model, example.servable))
        for name in filter(None, args.keras.split(",")):
            from examples.keras_export import export_probabilities
            from runtime.compiler.compile import compile_servable

            model, shape = keras_model(name)
            export_probabilities(model, work / name / "saved_model", shape)
            started = time.perf_counter()
            compile_servable(work / name / "saved_model", work / name / "servable" / "1",
                             batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")))
            rows.append({**measure(name, work / name / "saved_model", work / name / "servable" / "1"),
                         "compile_seconds": round(time.perf_counter() - started, 1)})
    write_results("servable_size", {"models": rows}, args.out)


if __name__ == "__main__":
    main()
