"""`half_plus_two`: TensorFlow Serving's canonical test model, rebuilt with the TF1 compat API.

As tensorflow_serving/servables/tensorflow/testdata/saved_model_half_plus_two.py: variables a=0.5,
b=2, c=3; y = a*x + b, y2 = a*x + c, y3 = a*x2 + c. Where it differs, and why:
- "serving_default" reads a float placeholder x of shape [None] (the original's has no shape), so
  that this example is an ordinary batched model for the tests that use it, and TF Serving's
  documented {"instances": [1.0, 2.0, 5.0]} -> {"predictions": [2.5, 3.0, 4.5]} holds. Kiln serves the
  original's unknown rank too (tests/test_unknown_rank.py builds it as TF Serving's script does).
- Every classify/regress signature, regress_x2_to_y3 included (the original feeds it the parsed x2),
  takes serialized tf.Examples (DT_STRING), as the standard signature builders require; Kiln
  parses them on the host and compiles the rest (README, "String inputs"). classify_x2_to_y3 is added beside classify_x_to_y.
- Both features default to 0.0 (the original requires x), and there is no asset file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def save(out: Path, log: Callable[[str], None] = print) -> None:
    """Write the SavedModel with tf.compat.v1.saved_model.Builder, as TF1-era exporters did."""
    import tensorflow as tf

    v1 = tf.compat.v1
    builder = v1.saved_model.Builder(str(out))
    with v1.Graph().as_default() as graph, v1.Session(graph=graph) as session:
        a = v1.Variable(0.5, name="a")
        b = v1.Variable(2.0, name="b")
        c = v1.Variable(3.0, name="c")

        x = v1.placeholder(tf.float32, shape=[None], name="x")
        y = tf.identity(a * x + b, name="y")

        serialized = v1.placeholder(tf.string, shape=[None], name="tf_example")
        features = v1.io.parse_example(serialized, {
            "x": v1.io.FixedLenFeature([1], tf.float32, default_value=[0.0]),
            "x2": v1.io.FixedLenFeature([1], tf.float32, default_value=[0.0]),
        })
        example_y = tf.identity(a * features["x"] + b, name="example_y")
        example_y2 = tf.identity(a * features["x"] + c, name="example_y2")
        example_y3 = tf.identity(a * features["x2"] + c, name="example_y3")

        regress = v1.saved_model.regression_signature_def
        classify = v1.saved_model.classification_signature_def
        signatures = {
            "serving_default": v1.saved_model.predict_signature_def(inputs={"x": x}, outputs={"y": y}),
            "classify_x_to_y": classify(examples=serialized, classes=None, scores=example_y),
            "classify_x2_to_y3": classify(examples=serialized, classes=None, scores=example_y3),
            "regress_x_to_y": regress(examples=serialized, predictions=example_y),
            "regress_x_to_y2": regress(examples=serialized, predictions=example_y2),
            "regress_x2_to_y3": regress(examples=serialized, predictions=example_y3),
        }
        session.run(v1.global_variables_initializer())
        builder.add_meta_graph_and_variables(session, [v1.saved_model.tag_constants.SERVING],
                                             signature_def_map=signatures)
    builder.save()
    log(f"half_plus_two: signatures {', '.join(sorted(signatures))}")
