"""TensorProto <-> numpy: every way a client may fill a request tensor, against Kiln's own messages."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.codecs.tensor_proto import from_ndarray, to_ndarray
from runtime.errors import InvalidInput, Unsupported
from runtime.protos import generated_module

TensorProto = generated_module("tensorflow.core.framework.tensor_pb2").TensorProto


def tensor(dtype: int, shape: list[int], **values) -> TensorProto:
    return TensorProto(dtype=dtype, tensor_shape={"dim": [{"size": size} for size in shape]}, **values)


def test_typed_fields_and_tensor_content_decode_alike():
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    typed = to_ndarray(tensor(1, [2, 3], float_val=array.ravel().tolist()))
    raw = to_ndarray(tensor(1, [2, 3], tensor_content=array.tobytes()))
    np.testing.assert_array_equal(typed, array)
    np.testing.assert_array_equal(raw, array)
    assert typed.dtype == raw.dtype == np.float32 and raw.flags.writeable


def test_tensorflow_fill_rules_for_short_typed_fields():
    np.testing.assert_array_equal(to_ndarray(tensor(3, [4], int_val=[1, 7])), [1, 7, 7, 7])
    np.testing.assert_array_equal(to_ndarray(tensor(9, [2])), [0, 0])
    with pytest.raises(InvalidInput, match="int64_val has 3 values"):
        to_ndarray(tensor(9, [2], int64_val=[1, 2, 3]))
    with pytest.raises(InvalidInput, match="needs 8"):
        to_ndarray(tensor(1, [2], tensor_content=b"\0" * 4))


def test_strings_halves_and_complex():
    strings = to_ndarray(tensor(7, [2], string_val=[b"a", b"\xff"]))
    assert strings.dtype == object and strings.tolist() == [b"a", b"\xff"]
    halves = np.array([1.5, -2], np.float16)
    np.testing.assert_array_equal(to_ndarray(tensor(19, [2], half_val=halves.view(np.uint16).tolist())), halves)
    np.testing.assert_array_equal(to_ndarray(tensor(8, [1], scomplex_val=[1, 2])), [1 + 2j])
    with pytest.raises(Unsupported):
        to_ndarray(tensor(20, [1]))
    with pytest.raises(InvalidInput, match="fully defined"):
        to_ndarray(tensor(1, [-1]))


@pytest.mark.parametrize("array", [np.arange(6, dtype=np.int64).reshape(3, 2), np.array(2.5, np.float64),
                                   np.array([True, False]), np.array([b"x", b"yz"], dtype=object)])
def test_round_trip(array):
    message = TensorProto()
    from_ndarray(array, message)
    back = to_ndarray(TensorProto.FromString(message.SerializeToString()))
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)
