"""Property tests of the wire codecs: what Kiln writes, a client can send back unchanged.

For every dtype and shape: TF Serving's JSON (row and columnar, one tensor or several named ones),
the Open Inference Protocol's JSON tensors, and TensorProto (tensor_content and the typed fields)
decode what they encode to the same dtype, shape and values. Floats round-trip exactly, NaN and
+/-Infinity included: real TF Serving writes a float with absl::StrCat and, when that does not parse
back to the same value, with "%.9g" (float) or "%.17g" (double), so its JSON is exact too (only a
NaN's sign and payload are lost, as in any JSON). Kiln writes the shortest exact form.

What JSON cannot carry is left out on purpose: a zero-sized dimension hides the dimensions after it
([[], []] is shape [2, 0] whatever followed, in TF Serving as here), and text outputs (all but
*_bytes in TF Serving's JSON, every OIP BYTES tensor) are UTF-8, so they round-trip as text.
"""

from __future__ import annotations

import json
import math

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from runtime.codecs import oip
from runtime.codecs.tensor_proto import VALUE_FIELD, from_ndarray, to_ndarray
from runtime.codecs.tfserving import decode_predict, encode_predict, read_predict
from runtime.errors import InvalidInput
from runtime.manifest import Signature, TensorSpec
from runtime.protos import generated_module

TensorProto = generated_module("tensorflow.core.framework.tensor_pb2").TensorProto

PROPERTIES = settings(max_examples=200, deadline=None)
NUMERIC = ("float16", "float32", "float64", "int8", "int16", "int32", "int64",
           "uint8", "uint16", "uint32", "uint64", "bool")
TEXT, BINARY = "text", "binary"  # string tensors: UTF-8 text, or any bytes (TF Serving's *_bytes, b64)
KINDS = NUMERIC + (TEXT, BINARY)


def object_array(values: list, shape: tuple[int, ...]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array.reshape(shape)


def numbers(dtype: np.dtype) -> st.SearchStrategy:
    """Any value of the dtype, its extremes (NaN, +/-Infinity, -0.0, the smallest subnormal, the
    largest finite) often: hypothesis alone rarely draws them."""
    if dtype.kind == "f":
        info = np.finfo(dtype)
        edges = [np.nan, np.inf, -np.inf, -0.0, info.smallest_subnormal, info.max, info.min]
        return st.one_of(st.sampled_from(edges), st.floats(width=8 * dtype.itemsize))
    if dtype.kind == "c":
        parts = numbers(np.dtype(f"f{dtype.itemsize // 2}"))
        return st.builds(complex, parts, parts)
    if dtype.kind == "b":
        return st.booleans()
    info = np.iinfo(dtype)
    return st.one_of(st.sampled_from([info.min, info.max]), st.integers(info.min, info.max))


def tensors(kind: str, shape: tuple[int, ...]) -> st.SearchStrategy[np.ndarray]:
    """Arrays of every value the dtype has; strings as bytes in object arrays."""
    if kind not in (TEXT, BINARY):
        return arrays(kind, shape, elements=numbers(np.dtype(kind)))
    values = st.binary(max_size=12) if kind == BINARY else st.text(max_size=8).map(str.encode)
    count = math.prod(shape)
    return st.lists(values, min_size=count, max_size=count).map(lambda v: object_array(v, shape))


def spec_dtype(kind: str) -> str:
    return "string" if kind in (TEXT, BINARY) else kind


def tensor_name(kind: str, index: int) -> str:
    """TF Serving writes an output as {"b64": ...} when its name ends in _bytes."""
    return f"t{index}_bytes" if kind == BINARY else f"t{index}"


def signature(named: dict[str, np.ndarray], kinds: list[str]) -> Signature:
    """A signature whose inputs (and outputs) are exactly these tensors, any size in each dimension."""
    specs = tuple(TensorSpec(name=name, dtype=spec_dtype(kind), shape=(None,) * array.ndim)
                  for (name, array), kind in zip(named.items(), kinds))
    return Signature(engine="saved-model", inputs=specs, outputs=specs)


def assert_identical(got: np.ndarray, want: np.ndarray) -> None:
    """Same dtype and shape; numbers bit for bit (any NaN for a NaN), strings as the same bytes."""
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == want.dtype, (got.dtype, want.dtype)
    if want.dtype == object:
        assert all(isinstance(v, bytes) for v in got.ravel()), got
        assert got.tolist() == want.tolist()
    elif want.dtype.kind in "fc":
        nan = np.isnan(want)
        assert (np.isnan(got) == nan).all(), (got, want)
        assert got[~nan].tobytes() == want[~nan].tobytes(), (got, want)
    else:
        assert got.tobytes() == want.tobytes(), (got, want)


def assert_all_identical(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for name, array in want.items():
        assert_identical(got[name], array)


@st.composite
def named_tensors(draw, *, min_dims: int, min_side: int = 1, max_count: int = 3):
    """1..max_count tensors of any kinds; with min_dims=1 they share dimension 0 (the batch)."""
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=max_count))
    batch = draw(st.integers(min_side, 3))
    named = {}
    for index, kind in enumerate(kinds):
        shape = draw(array_shapes(min_dims=min_dims, max_dims=4, min_side=min_side, max_side=3))
        if min_dims:
            shape = (batch,) + shape[1:]
        named[tensor_name(kind, index)] = draw(tensors(kind, shape))
    return named, kinds


def as_request(response: bytes, response_key: bytes, request_key: bytes) -> bytes:
    """The response's bytes sent back as a request: {"predictions": X} -> {"instances": X}."""
    prefix = b'{"' + response_key + b'":'
    assert response.startswith(prefix), response[:40]
    return b'{"' + request_key + b'":' + response[len(prefix):]


@PROPERTIES
@given(st.booleans().flatmap(lambda row: st.tuples(st.just(row), named_tensors(min_dims=int(row)))))
def test_tfserving_round_trips(case):
    """Row format (tensors share the batch dimension; "predictions" sent back as "instances") and
    columnar ("outputs" as "inputs", scalars too)."""
    row_format, (named, kinds) = case
    keys = (b"predictions", b"instances") if row_format else (b"outputs", b"inputs")
    body = as_request(encode_predict(named, row_format=row_format), *keys)
    decoded = decode_predict(*read_predict(body), signature(named, kinds))
    assert decoded.row_format == row_format
    assert_all_identical(decoded.inputs, named)


@PROPERTIES
@given(st.sampled_from(("float16", "float32", "float64")), st.data())
def test_tfserving_floats_are_written_exactly(dtype, data):
    """Every float, subnormals and the extremes included, parses back to the same bits."""
    values = data.draw(arrays(dtype, st.integers(1, 8), elements={"allow_nan": False, "allow_infinity": False}))
    written = orjson.loads(encode_predict({"y": values}, row_format=False))["outputs"]
    assert np.array(written, dtype=dtype).tobytes() == values.tobytes()


OIP_KINDS = tuple(dtype for dtype in oip.DATATYPE_OF if dtype != "string") + (TEXT,)  # BYTES: JSON strings


@PROPERTIES
@given(st.data(), st.one_of(st.none(), st.text(max_size=8)))
def test_oip_round_trips(data, request_id):
    """write_infer's response, as the server writes it, sent back as the inputs of an infer request;
    zero-sized dimensions too, since OIP states the shape."""
    kinds = data.draw(st.lists(st.sampled_from(OIP_KINDS), min_size=1, max_size=3))
    named = {f"t{i}": data.draw(tensors(kind, data.draw(array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=3))))
             for i, kind in enumerate(kinds)}
    response, header_length = oip.write_infer("m", 1, named, oip.InferRequest({}, id=request_id))
    assert header_length is None  # all JSON
    body = b'{"inputs":' + response[response.index(b'"outputs":') + len(b'"outputs":'):]
    decoded = oip.read_infer(body, signature(named, kinds))
    assert decoded.outputs is None and decoded.id == request_id
    assert_all_identical(decoded.inputs, named)


TENSOR_PROTO_KINDS = NUMERIC + ("complex64", "complex128", BINARY)


@st.composite
def any_tensor(draw, kinds=TENSOR_PROTO_KINDS):
    kind = draw(st.sampled_from(kinds))
    return draw(tensors(kind, draw(array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=3))))


@PROPERTIES
@given(any_tensor())
def test_tensor_proto_round_trips_through_the_wire(array):
    """from_ndarray (tensor_content, or string_val for strings), serialized and parsed again."""
    message = TensorProto()
    from_ndarray(array, message)
    assert_identical(to_ndarray(TensorProto.FromString(message.SerializeToString())), array)


def typed(array: np.ndarray, count: int | None = None) -> TensorProto:
    """A TensorProto holding the array in its dtype's typed field, as a client may fill it, with only
    the first `count` values (TensorFlow repeats the last one)."""
    message = TensorProto()
    from_ndarray(array, message)
    message.ClearField("tensor_content")
    flat = array.ravel()[:count]
    if message.dtype == 19:  # half_val: each float16's bits
        values = flat.view(np.uint16).tolist()
    elif array.dtype.kind == "c":  # real and imaginary parts, interleaved
        values = np.stack([flat.real, flat.imag], axis=-1).ravel().tolist()
    else:
        values = flat.tolist()
    getattr(message, VALUE_FIELD[message.dtype]).extend(values)
    return TensorProto.FromString(message.SerializeToString())


@PROPERTIES
@given(any_tensor(TENSOR_PROTO_KINDS[:-1]))
def test_tensor_proto_round_trips_from_typed_fields(array):
    assert_identical(to_ndarray(typed(array)), array)


@PROPERTIES
@given(any_tensor(NUMERIC), st.integers(1, 4))
def test_tensor_proto_repeats_the_last_typed_value(array, count):
    """TensorFlow's fill rule: a typed field shorter than the shape repeats its last value."""
    flat = array.ravel()
    if flat.size == 0:
        return
    count = min(count, flat.size)
    want = np.concatenate([flat[:count], np.repeat(flat[count - 1:count], flat.size - count)]).reshape(array.shape)
    assert_identical(to_ndarray(typed(array, count)), want)


@PROPERTIES
@given(st.sampled_from([(4, "uint8"), (5, "int16"), (6, "int8"), (17, "uint16")]), st.lists(numbers(np.dtype("int32"))))
def test_tensor_proto_int_val_casts_as_tensorflow_does(enum_and_dtype, values):
    """int_val holds int32s for the narrower dtypes too; TensorFlow casts (wraps) them, half_val
    keeps each float16's bits in an int32's low 16."""
    number, dtype = enum_and_dtype
    got = to_ndarray(TensorProto(dtype=number, int_val=values, tensor_shape={"dim": [{"size": len(values)}]}))
    assert_identical(got, np.array(values, np.int32).astype(dtype))
    halves = to_ndarray(TensorProto(dtype=19, half_val=values, tensor_shape={"dim": [{"size": len(values)}]}))
    assert_identical(halves, np.array(values, np.int32).astype(np.uint16).view(np.float16))


# Shapes no array can have: more elements than int64 counts, or past numpy's address space (at the
# widest dtype: uint8 [0, 2**62] fits, but not once the engine converts it to float32).
IMPOSSIBLE_SHAPES = [[2**32, 2**32], [2**63 - 1, 2], [0, 2**62], [0, 2**63 - 1], [2**62]]


@pytest.mark.parametrize("shape", IMPOSSIBLE_SHAPES)
@pytest.mark.parametrize("dtype, values", [(1, {}), (1, {"float_val": [1.0]}), (7, {}), (10, {"bool_val": [True]}),
                                           (4, {}), (4, {"tensor_content": b""})])
def test_tensor_proto_impossible_shapes_are_invalid_input(shape, dtype, values):
    with pytest.raises(InvalidInput):
        to_ndarray(TensorProto(dtype=dtype, tensor_shape={"dim": [{"size": size} for size in shape]}, **values))


@pytest.mark.parametrize("shape", IMPOSSIBLE_SHAPES + [[0, 2**64]])
def test_oip_impossible_shapes_are_invalid_input(shape):
    body = json.dumps({"inputs": [{"name": "x", "shape": shape, "datatype": "FP32", "data": []}]}).encode()
    with pytest.raises(InvalidInput):
        oip.read_infer(body, Signature(engine="saved-model", inputs=(), outputs=()))
