"""Every example signature at every bucket (and at sizes that split or pad) gives TensorFlow's
outputs for the same SavedModel, within 1e-5 in float32."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.engines import open_servable

TOLERANCE = 1e-5


def tensorflow_outputs(saved_model, key, inputs):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(saved_model))
    outputs = loaded.signatures[key](**{k: tf.constant(v) for k, v in inputs.items()})
    return {k: v.numpy() for k, v in outputs.items()}


def random_inputs(signature, rows, rng):
    return {spec.name: rng.random((rows, *spec.shape[1:])).astype(spec.dtype) for spec in signature.inputs}


@pytest.mark.parametrize("name", ["digits", "mobilenet_v2"])
def test_every_bucket_matches_tensorflow(examples, name):
    example = examples[name]
    engine = open_servable(example.servable)
    rng = np.random.default_rng(0)
    try:
        signature = engine.signature("serving_default")
        assert signature.engine == "xla-aot"
        sizes = sorted(set(engine.manifest.batch_sizes) | {3, engine.manifest.batch_sizes[-1] + 5})
        for rows in sizes:
            inputs = random_inputs(signature, rows, rng)
            ours = engine.run("serving_default", inputs)
            theirs = tensorflow_outputs(example.saved_model, "serving_default", inputs)
            assert set(ours) == set(theirs)
            for key in ours:
                assert ours[key].shape == theirs[key].shape
                diff = np.abs(ours[key] - theirs[key]).max()
                assert diff <= TOLERANCE, f"{name} batch {rows} output {key}: max abs diff {diff}"
    finally:
        engine.close()


def serialized_examples(values: dict[str, list[float]]) -> np.ndarray:
    import tensorflow as tf

    rows = len(next(iter(values.values())))
    protos = [tf.train.Example(features=tf.train.Features(feature={
        key: tf.train.Feature(float_list=tf.train.FloatList(value=[column[i]]))
        for key, column in values.items()})).SerializeToString() for i in range(rows)]
    return np.array(protos, dtype=object)


def test_half_plus_two_predict_classify_regress(examples):
    example = examples["half_plus_two"]
    engine = open_servable(example.servable)
    try:
        predict = engine.run("serving_default", {"x": np.array([1.0, 2.0, 5.0], np.float32)})
        np.testing.assert_allclose(predict["y"], [2.5, 3.0, 4.5])
        assert engine.signature("serving_default").engine == "xla-aot"
        x, x2 = [1.0, 2.0, 5.0, 7.0, 9.0], [3.0, 4.0, 0.0, 1.0, 2.0]
        inputs = {"inputs": serialized_examples({"x": x, "x2": x2})}
        expected = {
            "classify_x_to_y": np.array(x) * 0.5 + 2, "regress_x_to_y": np.array(x) * 0.5 + 2,
            "regress_x_to_y2": np.array(x) * 0.5 + 3, "regress_x2_to_y3": np.array(x2) * 0.5 + 3,
            "classify_x2_to_y3": np.array(x2) * 0.5 + 3,
        }
        for key, want in expected.items():
            signature = engine.signature(key)
            assert signature.engine == "xla-aot" and signature.host is not None  # tf.Examples parsed on the host
            outputs = engine.run(key, inputs)
            theirs = tensorflow_outputs(example.saved_model, key, inputs)
            for name, value in outputs.items():
                np.testing.assert_allclose(value, theirs[name], atol=TOLERANCE)
                np.testing.assert_allclose(value.reshape(-1), want, atol=TOLERANCE)
    finally:
        engine.close()
