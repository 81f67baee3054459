"""The Open Inference Protocol's JSON tensors (runtime.codecs.oip): what a request may hold, and the
400 that names what it holds instead."""

from __future__ import annotations

import orjson
import pytest

from runtime.codecs import oip
from runtime.errors import InvalidInput
from runtime.manifest import Signature, TensorSpec

SIGNATURE = Signature(engine="saved-model", inputs=(TensorSpec(name="x", dtype="float32", shape=(None,)),
                                                    TensorSpec(name="s", dtype="string", shape=(None,))),
                      outputs=(TensorSpec(name="y", dtype="float32", shape=(None,)),))


def infer(*tensors: dict):
    return oip.read_infer(orjson.dumps({"inputs": list(tensors)}), SIGNATURE)


@pytest.mark.parametrize("shape", [[True], [1, False], [1.0], [-1], "2", None])
def test_a_shape_is_a_list_of_non_negative_ints_and_not_bools(shape):
    """Before: [true] passed the int check (bool is an int in Python) and read as [1]."""
    with pytest.raises(InvalidInput, match=r"input 'x': 'shape' must be a list of non-negative integers, got"):
        infer({"name": "x", "shape": shape, "datatype": "FP32", "data": [1.0]})


@pytest.mark.parametrize("data, words", [
    ([1, "a"], "input 's': BYTES data must hold strings, got 1 (int)"),
    (["a", None], "got None (NoneType)"),
    ([{"b64": "YQ=="}, "a"], "got {'b64': 'YQ=='} (dict)"),
    ([["a"], ["a", "b"]], "input 's' cannot be read as a string tensor of one shape"),
])
def test_bytes_data_holds_strings(data, words):
    """Before: numbers, nulls, objects and ragged rows went into the input's object array, for
    TensorFlow to refuse outside any error handling (500)."""
    with pytest.raises(InvalidInput) as error:
        infer({"name": "s", "shape": [2], "datatype": "BYTES", "data": data})
    assert words in str(error.value)


def test_bytes_data_reads_text_flat_or_nested():
    request = infer({"name": "s", "shape": [2], "datatype": "BYTES", "data": [["a"], ["\u00e9"]]})
    assert list(request.inputs["s"]) == [b"a", "\u00e9".encode()]


def test_quoted_values_are_cut_short():
    with pytest.raises(InvalidInput) as error:
        infer({"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0], "parameters": {
            "binary_data_size": "7" * 5000}})
    assert len(str(error.value)) < 200
