"""`mobilenet_v2`: Keras' MobileNetV2 with random weights (fixed seed): a realistic image
classifier's graph and size (3.5 M parameters, depthwise convolutions) without downloading weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from examples.keras_export import export_probabilities

if TYPE_CHECKING:
    import keras

# The full 224x224: compiling all six buckets 1..32 took 52-58 s on this project's 2-core machine
# (3 s exporting the static signatures, 5.3-5.8 s of tfcompile per bucket, 15-20 s linking the six
# libraries in parallel), well under the ~6 minutes at which a smaller input (160, 128) would pay.
IMAGE_SIZE = 224
CALIBRATION_IMAGES = 8


def save(out: Path, log: Callable[[str], None] = print) -> None:
    """Build the seeded model, calibrate its normalization on seeded noise, export to `out`."""
    import keras

    keras.utils.set_random_seed(0)
    shape = (IMAGE_SIZE, IMAGE_SIZE, 3)
    model = keras.applications.MobileNetV2(weights=None, classes=1000, input_shape=shape)
    noise = np.random.default_rng(0).uniform(-1.0, 1.0, (CALIBRATION_IMAGES, *shape)).astype(np.float32)
    calibrate_batch_norm(model, noise)
    log(f"mobilenet_v2: {IMAGE_SIZE}x{IMAGE_SIZE}x3, {model.count_params():,} parameters")
    export_probabilities(model, out, shape)


def calibrate_batch_norm(model: keras.Model, images: np.ndarray) -> None:
    """Give every BatchNormalization the statistics of its input on `images`, in graph order.

    With fresh moving statistics (mean 0, variance 1) the activations shrink layer by layer until
    every logit is 0 and every probability exactly 1/1000, an output that cannot tell a correct
    compilation from a wrong one. Normalizing with measured statistics keeps each layer at unit
    scale, as in a trained network, and makes the probabilities differ by class and by image.
    """
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            features = keras.Model(model.input, layer.input)(images)
            layer.moving_mean.assign(keras.ops.mean(features, axis=(0, 1, 2)))
            layer.moving_variance.assign(keras.ops.var(features, axis=(0, 1, 2)))
