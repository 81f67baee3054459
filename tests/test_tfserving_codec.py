"""TensorFlow Serving's JSON predict format as `kiln predict` reads and writes it."""

from __future__ import annotations

import base64
import json

import numpy as np
import orjson
import pytest

from runtime.codecs.tfserving import decode_predict, encode_predict, read_predict
from runtime.errors import InvalidInput
from runtime.manifest import Signature, TensorSpec

SINGLE = Signature(engine="saved-model", inputs=(TensorSpec(name="x", dtype="float32", shape=(None, 2)),),
                   outputs=(TensorSpec(name="y", dtype="float32", shape=(None,)),))
PAIR = Signature(engine="saved-model", inputs=(TensorSpec(name="a", dtype="int32", shape=(None,)),
                                               TensorSpec(name="blob", dtype="string", shape=(None,))),
                 outputs=(TensorSpec(name="y", dtype="float32", shape=(None,)),))


def decode(body, signature):
    return decode_predict(*read_predict(body), signature)


def test_row_format_adds_the_batch_dimension():
    request = decode(b'{"instances": [[1, 2], [3, 4]], "unknown": 1}', SINGLE)
    assert request.row_format and request.signature_name == "serving_default"
    np.testing.assert_array_equal(request.inputs["x"], np.array([[1, 2], [3, 4]], np.float32))
    assert request.inputs["x"].dtype == np.float32


def test_row_objects_and_b64():
    blob = base64.b64encode(b"\x00\xff").decode()
    request = decode(orjson.dumps({"instances": [{"a": 1, "blob": {"b64": blob}}, {"a": 2, "blob": "text"}]}), PAIR)
    np.testing.assert_array_equal(request.inputs["a"], [1, 2])
    assert list(request.inputs["blob"]) == [b"\x00\xff", b"text"]


def test_columnar_takes_tensors_as_they_are():
    request = decode(b'{"signature_name": "s", "inputs": {"a": [1, 2], "blob": ["p", "q"]}}', PAIR)
    assert not request.row_format and request.signature_name == "s"
    assert request.inputs["a"].shape == (2,)


def test_bare_nan_and_infinity_are_read():
    request = decode(b'{"instances": [[NaN, Infinity], [-Infinity, 1]]}', SINGLE)
    x = request.inputs["x"]
    assert np.isnan(x[0, 0]) and x[0, 1] == np.inf and x[1, 0] == -np.inf


@pytest.mark.parametrize("body, message", [
    (b"[1, 2]", "must be a JSON object"),
    (b'{"instances": [[1, 2]], "inputs": [[1, 2]]}', "exactly one of 'instances'"),
    (b'{"signature_name": 3, "instances": [[1, 2]]}', "'signature_name' must be a string"),
    (b'{"instances": []}', "'instances' must be a non-empty list"),
    (b'{"instances": [[1, 2], [3]]}', "of one shape"),
    (b'{"instances": [{"x": [1, 2]}, [3, 4]]}', "all objects or all values"),
    (b'{"instances": ' + b"[" * 5000 + b"]" * 5000 + b"}", "JSON"),
    (b'{"instances": [{"a": 1, "blob": {"b64": "!!"}}]}', "invalid base64"),
])
def test_bad_bodies_are_named(body, message):
    signature = PAIR if b'"a"' in body else SINGLE
    with pytest.raises(InvalidInput, match=None) as error:
        decode(body, signature)
    assert message in str(error.value)


def test_multi_input_signature_needs_named_inputs():
    with pytest.raises(InvalidInput, match="keyed by input name"):
        decode(b'{"instances": [1, 2]}', PAIR)


def test_encoding_rows_columns_bytes_and_non_finite():
    y = np.array([0.5, 2.5], np.float32)
    assert orjson.loads(encode_predict({"y": y}, row_format=True)) == {"predictions": [0.5, 2.5]}
    assert orjson.loads(encode_predict({"y": y, "z": y * 2}, row_format=True)) == {
        "predictions": [{"y": 0.5, "z": 1.0}, {"y": 2.5, "z": 5.0}]}
    assert orjson.loads(encode_predict({"y": y, "z": y}, row_format=False)) == {"outputs": {"y": [0.5, 2.5], "z": [0.5, 2.5]}}
    encoded = encode_predict({"out_bytes": np.array([b"\x01"], dtype=object)}, row_format=False)
    assert orjson.loads(encoded) == {"outputs": [{"b64": "AQ=="}]}
    assert encode_predict({"y": np.array([np.nan, np.inf, -np.inf], np.float32)}, False) == \
        b'{"outputs":[NaN,Infinity,-Infinity]}'


def test_the_fast_path_decodes_numeric_rows_exactly_as_the_general_one():
    from runtime.codecs.tfserving import fast_predict, instances_text

    signature = Signature(method="tensorflow/serving/predict", batched=True, engine="saved-model",
                          inputs=[TensorSpec(name="images", dtype="float32", shape=(None, 2, 3, 1))],
                          outputs=[TensorSpec(name="p", dtype="float32", shape=(None, 2))])
    rng = np.random.default_rng(0)
    for rows in (1, 2, 7):
        images = (rng.standard_normal((rows, 2, 3, 1)) * 10.0 ** rng.integers(-30, 30, (rows, 2, 3, 1))).astype(np.float32)
        for body in (orjson.dumps({"instances": images.tolist()}),
                     json.dumps({"instances": images.tolist()}, indent=2).encode() + b"\n"):
            fast = fast_predict(instances_text(body), signature)
            general = decode_predict(*read_predict(body), signature)
            assert fast is not None and fast.row_format and fast.signature_name == "serving_default"
            np.testing.assert_array_equal(fast.inputs["images"], general.inputs["images"])
            assert fast.inputs["images"].dtype == np.float32


@pytest.mark.parametrize("body", [
    b'{"instances": [[[[1],[2],[3]],[[4],[5],[6]]], [[[1],[2],[3]],[[4],[5]]]]}',  # ragged
    b'{"instances": [[[[NaN],[2],[3]],[[4],[5],[6]]]]}',  # bare NaN: the general parser's
    b'{"instances": [[[["1"],[2],[3]],[[4],[5],[6]]]]}',  # a string
    b'{"instances": [[[[1],[2],[3]],[[4],[5],[6]]]], "signature_name": "other"}',
    b'{"instances": [[[[1e],[2],[3]],[[4],[5],[6]]]]}',  # not a number
    b'{"instances": []}',
    b'{"inputs": [[[[1],[2],[3]],[[4],[5],[6]]]]}',
])
def test_the_fast_path_leaves_everything_else_to_the_general_one(body):
    from runtime.codecs.tfserving import fast_predict, instances_text

    signature = Signature(method="tensorflow/serving/predict", batched=True, engine="saved-model",
                          inputs=[TensorSpec(name="images", dtype="float32", shape=(None, 2, 3, 1))],
                          outputs=[TensorSpec(name="p", dtype="float32", shape=(None, 2))])
    text = instances_text(body)
    assert text is None or fast_predict(text, signature) is None
