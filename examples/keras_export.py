"""Exporting a Keras 3 model the way TensorFlow Serving users do: one "serving_default" signature."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras


def export_probabilities(model: keras.Model, out: Path, input_shape: tuple[int, ...]) -> None:
    """Write a SavedModel whose "serving_default" maps {"images": (None, *input_shape) float32}
    to {"probabilities": model(images)}, with a free batch dimension for Kiln's buckets."""
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name="serving_default",
        fn=lambda images: {"probabilities": model(images, training=False)},
        input_signature=[tf.TensorSpec((None, *input_shape), tf.float32, name="images")],
    )
    archive.write_out(str(out), verbose=False)
