"""Signatures that are one function (Keras's `serve` and `serving_default`) are compiled once: the
manifest maps both names to the same libraries, and both answer like TensorFlow."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.compiler.compile import compile_servable
from runtime.engines import open_servable
from runtime.manifest import read_manifest

BUCKETS = (1, 4)


@pytest.fixture(scope="module")
def keras_export(tmp_path_factory):
    """A Keras model exported the usual way (model.export), which writes serve and serving_default."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="relu"), keras.layers.Dense(3)])
    out = tmp_path_factory.mktemp("keras") / "exported"
    model.export(str(out), format="tf_saved_model", verbose=False)
    return out


@pytest.fixture(scope="module")
def two_functions(tmp_path_factory):
    """One tf.function saved under two names, and another function over the same variable."""
    import tensorflow as tf

    module = tf.Module()
    module.scale = tf.Variable([1.0, 2.0, 3.0])
    spec = tf.TensorSpec([None, 3], tf.float32, name="x")

    @tf.function(input_signature=[spec])
    def scaled(x):
        return {"y": x * module.scale}

    @tf.function(input_signature=[spec])
    def shifted(x):
        return {"y": x + module.scale}

    out = tmp_path_factory.mktemp("plain") / "saved"
    tf.saved_model.save(module, str(out), signatures={"a": scaled, "b": scaled, "other": shifted})
    return out


def test_serve_and_serving_default_compile_once(keras_export, tmp_path):
    import tensorflow as tf

    exported = keras_export
    manifest = compile_servable(exported, tmp_path / "model" / "1", batch_sizes=BUCKETS)
    assert set(manifest.signatures) == {"serve", "serving_default"}
    assert manifest.signatures["serve"].libraries == manifest.signatures["serving_default"].libraries
    libraries = sorted(path.name for path in (tmp_path / "model" / "1" / "lib").glob("*.so"))
    assert len([name for name in libraries if "_b" in name]) == len(BUCKETS), libraries
    assert read_manifest(tmp_path / "model" / "1") == manifest

    loaded = tf.saved_model.load(str(exported))
    # Keras names the input keras_tensor_N after every tensor made before it in this process.
    name = manifest.signatures["serving_default"].inputs[0].name
    inputs = {name: np.random.default_rng(0).random((3, 6), np.float32)}
    engine = open_servable(tmp_path / "model" / "1")
    try:
        for key in ("serve", "serving_default"):
            theirs = loaded.signatures[key](**{name: tf.constant(inputs[name])})["output_0"].numpy()
            np.testing.assert_allclose(engine.run(key, inputs)["output_0"], theirs, atol=1e-5)
    finally:
        engine.close()


def test_a_different_function_is_compiled_on_its_own(two_functions, tmp_path):
    manifest = compile_servable(two_functions, tmp_path / "model" / "1", batch_sizes=(2,))
    libraries = {key: signature.libraries for key, signature in manifest.signatures.items()}
    assert libraries["a"] == libraries["b"]
    assert libraries["other"] != libraries["a"]
    engine = open_servable(tmp_path / "model" / "1")
    try:
        x = {"x": np.ones((2, 3), np.float32)}
        for key, want in (("a", [1.0, 2.0, 3.0]), ("b", [1.0, 2.0, 3.0]), ("other", [2.0, 3.0, 4.0])):
            np.testing.assert_allclose(engine.run(key, x)["y"], [want, want])
    finally:
        engine.close()
