"""The benchmark model of load/workers.py: a 32x32x3 CNN (Conv2D, BatchNormalization, DepthwiseConv2D,
GELU, softmax) with seeded random weights, exported as examples/ export theirs ("serving_default":
images -> probabilities) and compiled into a servable. Both are cached under KILN_CACHE_DIR/bench,
keyed by this file and the TensorFlow version, since the compile takes minutes on 2 cores."""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NAME = "cnn32"
SHAPE = (32, 32, 3)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


def build(log=print) -> tuple[Path, Path]:
    """(SavedModel directory, servable directory), built once and then taken from the cache."""
    import tensorflow as tf

    from runtime.cache import cache_root

    key = hashlib.sha256(Path(__file__).read_bytes() + tf.__version__.encode()).hexdigest()[:16]
    entry = cache_root() / "bench" / f"{NAME}-{key}"
    if not entry.is_dir():
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.partial-", dir=entry.parent))
        try:
            _save(staging / "saved_model")
            from runtime.compiler.compile import compile_servable

            compile_servable(staging / "saved_model", staging / "servable", name=NAME, version=1,
                             batch_sizes=BATCH_SIZES, log=lambda message: log(f"{NAME}: {message}"))
            staging.rename(entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return entry / "saved_model", entry / "servable"


def _save(out: Path) -> None:
    import keras

    from examples.keras_export import export_probabilities

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input(SHAPE),
        keras.layers.Conv2D(32, 3, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.Activation("gelu"),
        keras.layers.DepthwiseConv2D(3, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.Activation("gelu"),
        keras.layers.Conv2D(64, 1, strides=2),
        keras.layers.Activation("gelu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    export_probabilities(model, out, SHAPE)


if __name__ == "__main__":
    print(build())
