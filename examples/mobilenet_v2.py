"""`mobilenet_v2`: Keras' MobileNetV2 (random weights, fixed seed): a realistic image classifier's
graph and size (3.5 M parameters, depthwise convolutions) without downloading trained weights."""

from __future__ import annotations

from pathlib import Path

from examples.keras_export import export_probabilities

IMAGE_SIZE = 224


def save(out: Path, log=print) -> None:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(
        weights=None, classes=1000, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3))
    log(f"mobilenet_v2: {IMAGE_SIZE}x{IMAGE_SIZE}x3, {model.count_params():,} parameters")
    export_probabilities(model, out, (IMAGE_SIZE, IMAGE_SIZE, 3))
