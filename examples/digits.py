"""`digits`: a small CNN trained on scikit-learn's 8x8 digits, upscaled to MNIST's 28x28 layout."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from examples.keras_export import export_probabilities

if TYPE_CHECKING:
    import keras

IMAGE_SHAPE = (28, 28, 1)
EPOCHS = 15


def load_images() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits as (N, 28, 28, 1) float32 in [0, 1], and their labels.

    Each 8x8 pixel becomes a 3x3 block (24x24), centred with a 2-pixel border like MNIST's.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.kron(digits.images, np.ones((3, 3))) / 16.0
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return images[..., None].astype(np.float32), digits.target.astype(np.int64)


def save(out: Path, log: Callable[[str], None] = print) -> None:
    """Train with fixed seeds and split (bit-identical weights run to run on CPU), export to `out`."""
    import keras

    keras.utils.set_random_seed(0)
    model, accuracy, tested = _train()
    log(f"digits: test accuracy {accuracy:.4f} on {tested} held-out images")
    export_probabilities(model, out, IMAGE_SHAPE)


def _train() -> tuple[keras.Model, float, int]:
    """The trained model, its accuracy on a held-out fifth of the digits, and that fifth's size."""
    import keras
    from sklearn.model_selection import train_test_split

    images, labels = load_images()
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, random_state=0, stratify=labels)
    model = keras.Sequential([
        keras.Input(IMAGE_SHAPE),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dropout(0.3),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=32, epochs=EPOCHS, shuffle=True, verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    return model, accuracy, len(x_test)
