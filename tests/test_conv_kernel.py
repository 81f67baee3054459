"""Kiln's own float convolution kernel (runtime/compiler/kernels/conv_f32.cc) against TensorFlow,
over the shapes XLA hands it: strides, padding, dilations, groups, depthwise, transposed, 1x1."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.compiler.compile import compile_servable
from runtime.engines import open_servable

BUCKETS = (1, 3)


def conv_zoo():
    import keras

    keras.utils.set_random_seed(7)
    layers = keras.layers
    image = keras.Input((13, 11, 4), name="image")
    outputs = {
        "strided_same": layers.Conv2D(8, 3, strides=2, padding="same")(image),
        "valid_rect": layers.Conv2D(5, (2, 4), padding="valid")(image),
        "dilated": layers.Conv2D(6, 3, dilation_rate=2, padding="same")(image),
        "grouped": layers.Conv2D(6, 3, groups=2, padding="same")(image),
        "pointwise": layers.Conv2D(7, 1)(image),
        "depthwise": layers.DepthwiseConv2D(3, padding="same")(image),
        "depthwise_x2_strided": layers.DepthwiseConv2D(3, strides=2, depth_multiplier=2)(image),
        "transposed": layers.Conv2DTranspose(5, 3, strides=2, padding="same")(image),
    }
    return keras.Model({"image": image}, outputs)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    import keras
    import tensorflow as tf

    root = tmp_path_factory.mktemp("conv")
    model = conv_zoo()
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", lambda image: model({"image": image}),
                         input_signature=[tf.TensorSpec((None, 13, 11, 4), tf.float32, name="image")])
    archive.write_out(str(root / "saved_model"))
    compile_servable(root / "saved_model", root / "zoo" / "1", engine="xla-aot", batch_sizes=BUCKETS)
    return root


@pytest.mark.parametrize("rows", [1, 2, 3, 5])
@pytest.mark.parametrize("threads", [1, 2])
def test_every_convolution_matches_tensorflow(zoo, rows, threads):
    import tensorflow as tf

    rng = np.random.default_rng(rows)
    inputs = {"image": rng.standard_normal((rows, 13, 11, 4), dtype=np.float32)}
    expected = tf.saved_model.load(str(zoo / "saved_model")).signatures["serving_default"](
        **{k: tf.constant(v) for k, v in inputs.items()})
    engine = open_servable(zoo / "zoo" / "1", threads=threads)
    try:
        ours = engine.run("serving_default", inputs)
    finally:
        engine.close()
    assert set(ours) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(ours[name], value.numpy(), atol=1e-5, rtol=1e-5, err_msg=name)


def test_the_compiled_code_calls_kilns_kernels_where_tensorflow_was_imported_first(digits, tmp_path):
    """TensorFlow loads its own XLA runtime into the process's global scope, where the dynamic linker
    looks before a library's own dependencies: a bucket library then called XLA's Eigen convolution,
    13x slower on MobileNetV2 than Kiln's, in place of its runtime's. Bindings, as ld.so reports them."""
    import os
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, tensorflow\n"
        "from runtime.engines import open_servable\n"
        "engine = open_servable(sys.argv[1])\n"
        "spec = engine.signature('serving_default').inputs[0]\n"
        "engine.run('serving_default', {spec.name: np.zeros((2, *spec.shape[1:]), spec.dtype)})\n"
    )
    log = tmp_path / "bindings"
    env = {**os.environ, "LD_DEBUG": "bindings", "LD_DEBUG_OUTPUT": str(log), "TF_CPP_MIN_LOG_LEVEL": "3"}
    subprocess.run([sys.executable, "-c", code, str(digits.servable)], env=env, check=True, capture_output=True)
    bound = [
        line
        for path in tmp_path.glob("bindings*")
        for line in path.read_text(errors="replace").splitlines()
        if "EigenConv2D" in line and "_serving_default_b" in line.split(" to ")[0]
    ]
    assert bound, "the bucket library's convolution was never bound"
    for line in bound:
        assert "libkiln_runtime-" in line.split(" to ")[1], line
