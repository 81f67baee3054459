"""tensorflow.TensorProto <-> numpy, for TensorFlow Serving's gRPC API.

Numpy only: the caller passes in the protobuf messages (generated from Kiln's own .proto files), so
this module imports neither protobuf nor TensorFlow. A request tensor may carry its values in
`tensor_content` (raw little-endian bytes, what tf.make_tensor_proto writes for numeric arrays) or
in the typed repeated field for its dtype; as in TensorFlow, a shorter typed field is padded with
its last value. Responses use `tensor_content`, or `string_val` for DT_STRING.
"""

from __future__ import annotations

import math

import numpy as np

from runtime.errors import InvalidInput, Unsupported

# tensorflow.DataType numbers (tensorflow/core/framework/types.proto) for the dtypes Kiln runs.
DT_STRING = 7
DT_HALF = 19
DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),
    2: np.dtype("<f8"),
    3: np.dtype("<i4"),
    4: np.dtype("u1"),
    5: np.dtype("<i2"),
    6: np.dtype("i1"),
    8: np.dtype("<c8"),
    9: np.dtype("<i8"),
    10: np.dtype("?"),
    17: np.dtype("<u2"),
    18: np.dtype("<c16"),
    19: np.dtype("<f2"),
    22: np.dtype("<u4"),
    23: np.dtype("<u8"),
}
MAX_ELEMENTS = 2**63 - 1  # TensorShape's limit on the number of elements
WIDEST_ITEMSIZE = max(dtype.itemsize for dtype in DTYPES.values())
ENUM_OF: dict[str, int] = {dtype.name: number for number, dtype in DTYPES.items()}
# The typed field that holds each dtype's values when tensor_content is empty.
VALUE_FIELD: dict[int, str] = {
    1: "float_val",
    2: "double_val",
    3: "int_val",
    4: "int_val",
    5: "int_val",
    6: "int_val",
    8: "scomplex_val",
    9: "int64_val",
    10: "bool_val",
    17: "int_val",
    18: "dcomplex_val",
    19: "half_val",
    22: "uint32_val",
    23: "uint64_val",
}


def to_ndarray(tensor) -> np.ndarray:
    """The numpy array a TensorProto describes; strings become an object array of bytes."""
    if tensor.tensor_shape.unknown_rank:
        raise InvalidInput("a request tensor must have a known shape")
    shape = tuple(dim.size for dim in tensor.tensor_shape.dim)
    if any(size < 0 for size in shape):
        raise InvalidInput(f"a request tensor must have a fully defined shape, got {list(shape)}")
    count = math.prod(shape)  # exact: numpy's int64 product wraps around
    if count > MAX_ELEMENTS:
        raise InvalidInput(
            f"a tensor of shape {list(shape)} has {count} elements; TensorFlow counts at most {MAX_ELEMENTS}"
        )
    if tensor.dtype == DT_STRING:
        return _shaped(_fill(np.array(list(tensor.string_val), dtype=object), count, "string_val"), shape)
    dtype = DTYPES.get(tensor.dtype)
    if dtype is None:
        raise Unsupported(f"tensor dtype enum {tensor.dtype} is not supported")
    if tensor.tensor_content:
        if len(tensor.tensor_content) != count * dtype.itemsize:
            raise InvalidInput(
                f"tensor_content has {len(tensor.tensor_content)} bytes; shape {list(shape)} "
                f"of {dtype.name} needs {count * dtype.itemsize}"
            )
        return _shaped(np.frombuffer(tensor.tensor_content, dtype=dtype), shape).astype(dtype.newbyteorder("="))
    field = VALUE_FIELD[tensor.dtype]
    values = getattr(tensor, field)
    if tensor.dtype == DT_HALF:  # half_val holds each float16's bit pattern in an int32's low 16 bits
        flat = np.array(values, dtype=np.int32).astype(np.uint16).view(np.float16)
    elif field == "int_val":  # int32s for the narrower dtypes too: cast (wrapping) as TensorFlow does
        flat = np.array(values, dtype=np.int32).astype(dtype)
    elif field in ("scomplex_val", "dcomplex_val"):  # real and imaginary parts, interleaved
        parts = np.array(values, dtype=np.float32 if field == "scomplex_val" else np.float64)
        if len(parts) % 2:
            raise InvalidInput(f"{field} holds (real, imaginary) pairs; it has an odd number of values, {len(parts)}")
        flat = parts.view(dtype)  # their memory layout: not arithmetic, which turns 1j * inf into nan
    else:
        flat = np.array(values, dtype=dtype)
    return _shaped(_fill(flat, count, field), shape)


def _fill(flat: np.ndarray, count: int, field: str) -> np.ndarray:
    """TensorFlow's rule: no values means zeros (empty strings); fewer repeat the last one."""
    if len(flat) == count:
        return flat
    if len(flat) > count:
        raise InvalidInput(f"{field} has {len(flat)} values; the tensor's shape holds {count}")
    try:
        if len(flat) == 0:
            return np.full(count, b"", dtype=object) if flat.dtype == object else np.zeros(count, flat.dtype)
        return np.concatenate([flat, np.full(count - len(flat), flat[-1], dtype=flat.dtype)])
    except (MemoryError, ValueError) as e:  # TF Serving answers a tensor it cannot allocate as a parse error
        raise InvalidInput(f"cannot fill {field} out to the tensor's {count} values: {e}") from None


def _shaped(flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """numpy refuses a shape whose nonzero dimensions multiply past its address space (in bytes), even
    when another dimension is 0. Counted at the widest element (complex128), not this tensor's: the
    engine converts it to the signature's dtype, and uint8 [0, 2**62] would fail there as float32."""
    if math.prod(size for size in shape if size) * WIDEST_ITEMSIZE > np.iinfo(np.intp).max:
        raise InvalidInput(
            f"a tensor of shape {list(shape)} cannot be held: its nonzero dimensions multiply past the address space"
        )
    try:
        return flat.reshape(shape)
    except ValueError as e:
        raise InvalidInput(f"a tensor of shape {list(shape)} cannot be held: {e}") from None


def from_ndarray(array: np.ndarray, tensor) -> None:
    """Write an array into an empty TensorProto: dtype, shape and values."""
    for size in array.shape:
        tensor.tensor_shape.dim.add(size=size)
    if array.dtype.kind in "OSU":
        tensor.dtype = DT_STRING
        tensor.string_val.extend(v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1))
        return
    number = ENUM_OF.get(array.dtype.name)
    if number is None:
        raise Unsupported(f"output dtype {array.dtype.name} cannot be sent as a TensorProto")
    tensor.dtype = number
    tensor.tensor_content = np.ascontiguousarray(array, dtype=DTYPES[number]).tobytes()
