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
    b'{"instances": [[[[1.2.3],[2],[3]],[[4],[5],[6]]]]}',  # nor this
    b'{"instances": [[[[1e400],[2],[3]],[[4],[5],[6]]]]}',  # beyond a double: the general parser's
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


SURROGATE = b"\xed\xa0\x80"  # U+D800 written as UTF-8: orjson refuses it, the standard parser (given bytes) took it


@pytest.mark.parametrize("read", ["predict", "examples", "generate", "infer", "infer binary header"])
@pytest.mark.parametrize("where", ["key", "value", "escaped value"])
def test_surrogates_are_refused_at_decode_by_every_json_entry_point(read, where):
    """Before: the standard parser's fallback let them in, and the error messages quoting them, the
    :generate prompt, the examples and the OIP id then failed to encode, far from the request (500)."""
    from runtime.codecs import examples, oip
    from runtime.sessions.generate import read_generate

    text = {"key": b'"a' + SURROGATE + b'": 1', "value": b'"prompt": "a' + SURROGATE + b'"',
            "escaped value": b'"id": "\\ud800"'}[where]
    body = b'{"instances": [1.0], "examples": [{}], "prompt": "x", "inputs": [], ' + text + b"}"
    decode = {"predict": read_predict, "examples": examples.read_examples, "generate": read_generate,
              "infer": oip.infer_header, "infer binary header": lambda b: oip.infer_header(b + b"\x00" * 4, len(b))}
    with pytest.raises(InvalidInput, match="malformed JSON") as error:
        decode[read](body)
    message = str(error.value)
    message.encode()  # the message itself can be written
    assert ("UTF-8" in message and "ed a0 80" in message) if where != "escaped value" else "surrogate" in message


def test_bare_nan_still_takes_the_fallback_and_utf16_does_not():
    assert read_predict(b'{"instances": [NaN], "s": "\xc3\xa9"}')[1]["s"] == "\u00e9"
    with pytest.raises(InvalidInput, match="UTF-8"):
        read_predict('{"instances": [NaN]}'.encode("utf-16"))


STRINGS = Signature(engine="saved-model", inputs=(TensorSpec(name="s", dtype="string", shape=(None,)),),
                    outputs=(TensorSpec(name="y", dtype="float32", shape=(None,)),))


@pytest.mark.parametrize("body, words", [
    (b'{"instances": [1, "a"]}', "input 's' must hold strings or {\"b64\": \"...\"} objects, got 1 (int)"),
    (b'{"instances": ["a", null]}', "got None (NoneType)"),
    (b'{"inputs": {"s": [["a"], ["a", "b"]]}}', "input 's' cannot be read as a string tensor of one shape"),
    (b'{"inputs": [["a", "b"], ["c", ["d"]]]}', "of one shape"),
    (b'{"instances": [true]}', "got True (bool)"),
    (b'{"instances": [{"b64": "\xc3\xa9"}]}', "input 's': invalid base64"),
])
def test_string_inputs_are_checked_as_numeric_ones_are(body, words):
    """Before: numbers, nulls and ragged rows became object arrays that only TensorFlow refused (500)."""
    with pytest.raises(InvalidInput) as error:
        decode(body, STRINGS)
    assert words in str(error.value)


def test_an_object_array_reaching_the_engine_holds_only_bytes():
    """The engine's own check, for callers that build arrays themselves (as Lambda's events and
    `kiln score` do): before, a list or a number went on to tf.constant."""
    from runtime.engines.base import check_inputs

    arrays, _ = check_inputs(STRINGS, {"s": np.array([b"a", "\u00e9"], dtype=object)})
    assert list(arrays["s"]) == [b"a", "\u00e9".encode()]
    ragged = np.empty(2, dtype=object)
    ragged[:] = [[b"a"], [b"a", b"b"]]
    for value, words in [(ragged, "got a list (rows of different lengths?) at index [0]"),
                         (np.array([b"a", 5], dtype=object), "got int at index [1]"),
                         (np.array(["\ud800"], dtype=object), "not valid Unicode")]:
        with pytest.raises(InvalidInput, match="input 's'") as error:
            check_inputs(STRINGS, {"s": value})
        assert words in str(error.value)


@pytest.mark.parametrize("feature, words", [
    (b"1" + b"0" * 400, "feature 'x': integers must fit in int64"),
    (b"9223372036854775808", "feature 'x': integers must fit in int64 (an int64_list), got 9223372036854775808"),
    (b"[1.5, 1" + b"0" * 400 + b"]", "feature 'x': 1000000000"),
    (b'{"b64": "\xc3\xa9"}', "feature 'x': invalid base64"),
], ids=["10^400", "2^63", "10^400 beside a float", "non-ASCII b64"])
def test_example_values_that_do_not_fit_a_feature_name_it(feature, words):
    """Before: protobuf's ValueError and float()'s OverflowError escaped (500)."""
    from runtime.codecs.examples import read_examples, serialize

    with pytest.raises(InvalidInput) as error:
        serialize(read_examples(b'{"examples": [{"x": ' + feature + b"}]}")[1])
    assert words in str(error.value) and len(str(error.value)) < 200
    assert serialize([{"x": [-2**63, 2**63 - 1]}])[0]  # the int64 range itself is fine
