"""The Open Inference Protocol's (KServe v2) JSON tensors: infer requests to arrays, outputs to
responses, and model metadata. A tensor is {name, shape, datatype, data}, data flat in row-major
order (nested lists are accepted too).

The binary tensor data extension (Triton's, which tritonclient.http uses by default): with the
request header Inference-Header-Content-Length, the body is that many bytes of JSON followed by the
binary data of every input that has a `binary_data_size` parameter, in input order. Outputs asked
for with `binary_data: true` (or all, with the request's `binary_data_output: true`) go back the
same way. The binary form (from_raw, to_raw) is also what the gRPC protocol's raw contents hold:
little-endian, row-major; BYTES as each element's 4-byte little-endian length, then its bytes.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from runtime.codecs.tfserving import DEFAULT_SIGNATURE, loads, string_array
from runtime.errors import InvalidInput, Unsupported, shown
from runtime.manifest import Signature, TensorSpec, show_shape

DATATYPES = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BYTES": "string",
}
DATATYPE_OF = {dtype: name for name, dtype in DATATYPES.items()}
EXTENSIONS = ("model_repository", "binary_tensor_data")
HEADER_LENGTH = "Inference-Header-Content-Length"


def datatype(dtype: str) -> str:
    if dtype not in DATATYPE_OF:
        raise Unsupported(f"dtype {dtype} has no Open Inference Protocol datatype")
    return DATATYPE_OF[dtype]


def server_metadata(version: str) -> dict:
    return {"name": "kiln", "version": version, "extensions": list(EXTENSIONS)}


@dataclass(frozen=True)
class InferRequest:
    """A decoded infer request: its inputs, the outputs it asks for (None: all), its id, and which
    outputs go back as binary data."""

    inputs: dict[str, np.ndarray]
    outputs: list[str] | None = None
    id: str | None = None
    binary_outputs: dict[str, bool] = field(default_factory=dict)  # a requested output's binary_data
    binary_default: bool = False  # the request's binary_data_output

    def binary(self, name: str) -> bool:
        return self.binary_outputs.get(name, self.binary_default)


def read_infer(body: bytes, signature: Signature, header_length: str | int | None = None) -> InferRequest:
    """An infer request. With `header_length` (the Inference-Header-Content-Length header) the JSON
    is the body's first header_length bytes, and binary input data follows it."""
    return infer_request(*infer_header(body, header_length), signature)


def infer_header(body: bytes, header_length: str | int | None = None) -> tuple[dict, _Binary]:
    """The request's JSON object, and the binary data after it: read before the signature is known,
    since the request's parameters may choose it."""
    header, binary = _split(body, header_length)
    try:
        request = loads(header)
    except InvalidInput as e:
        if header_length is None and b'"binary_data_size"' in body:
            raise InvalidInput(f"{e}; a body with binary tensor data needs the {HEADER_LENGTH} header") from None
        raise
    if not isinstance(request, dict):
        raise InvalidInput("the infer request must be a JSON object")
    if request.get("parameters") is not None and not isinstance(request["parameters"], dict):
        raise InvalidInput("the request: 'parameters' must be an object")
    return request, binary


def infer_request(request: dict, binary: _Binary, signature: Signature) -> InferRequest:
    """The request (from infer_header) decoded against the signature."""
    tensors = request.get("inputs")
    if not isinstance(tensors, list) or not tensors:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")
    inputs = {}
    for tensor in tensors:
        name, array = _tensor(tensor, signature, binary)
        if name in inputs:
            raise InvalidInput(f"input '{name}' is given twice")
        inputs[name] = array
    binary.finished()
    requested = request.get("outputs")
    names, binary_outputs = None, {}
    if requested is not None:
        if not isinstance(requested, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in requested
        ):
            raise InvalidInput("'outputs' must be a list of {\"name\": ...} objects")
        names = [o["name"] for o in requested]
        check_outputs(names, signature)
        for output in requested:
            flag = _parameter(output, "binary_data", bool, f"output '{output['name']}'")
            if flag is not None:
                binary_outputs[output["name"]] = flag
    binary_default = _parameter(request, "binary_data_output", bool, "the request") or False
    request_id = request.get("id")
    return InferRequest(
        inputs, names, request_id if isinstance(request_id, str) else None, binary_outputs, binary_default
    )


def check_input(name: str, kind: str, shape: Sequence[int], signature: Signature) -> str:
    """The numpy dtype of an input sent as (datatype, shape), both checked against the signature."""
    if kind not in DATATYPES:
        raise InvalidInput(f"input '{name}': unknown datatype {kind!r}; expected one of {', '.join(DATATYPES)}")
    spec = signature.input(name)
    if spec is None:
        raise InvalidInput(f"unknown input '{name}'; the model takes {', '.join(s.name for s in signature.inputs)}")
    if spec.dtype != DATATYPES[kind]:
        raise InvalidInput(f"input '{name}' must have datatype {datatype(spec.dtype)}, got {kind}")
    if spec.shape is not None and (
        len(shape) != len(spec.shape) or any(want not in (None, got) for want, got in zip(spec.shape, shape))
    ):
        raise InvalidInput(f"input '{name}' must have shape {show_shape(spec.shape)}, got {show_shape(shape)}")
    return DATATYPES[kind]


def check_outputs(names: list[str], signature: Signature) -> None:
    known = {spec.name for spec in signature.outputs}
    if unknown := [n for n in names if n not in known]:
        raise InvalidInput(f"unknown output(s) {', '.join(unknown)}; the model has {', '.join(sorted(known))}")


def _parameter(owner: dict, key: str, kind: type, what: str):
    """One of an object's `parameters`, None if absent; bool or a non-negative int."""
    parameters = owner.get("parameters")
    if parameters is None:
        return None
    if not isinstance(parameters, dict):
        raise InvalidInput(f"{what}: 'parameters' must be an object")
    value = parameters.get(key)
    if value is None:
        return None
    if kind is bool and not isinstance(value, bool):
        raise InvalidInput(f"{what}: parameter {key} must be true or false, got {shown(value)}")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise InvalidInput(f"{what}: parameter {key} must be a non-negative integer, got {shown(value)}")
    return value


class _Binary:
    """The binary data after a request's JSON header, handed to its inputs in order."""

    def __init__(self, data: memoryview | None):
        self.data, self.offset = data, 0

    def take(self, name: str, size: int) -> memoryview:
        if self.data is None:
            raise InvalidInput(
                f"input '{name}' has a binary_data_size parameter, but the request has no "
                f"{HEADER_LENGTH} header to say where the JSON ends and binary data starts"
            )
        left = len(self.data) - self.offset
        if size > left:
            raise InvalidInput(
                f"input '{name}': binary_data_size is {size}, but only {left} bytes of binary data are left in the body"
            )
        self.offset += size
        return self.data[self.offset - size : self.offset]

    def finished(self) -> None:
        if self.data is not None and self.offset != len(self.data):
            raise InvalidInput(
                f"the body has {len(self.data) - self.offset} bytes of binary data after the JSON "
                f"that no input's binary_data_size accounts for"
            )


def _split(body: bytes, header_length: str | int | None) -> tuple[bytes, _Binary]:
    if header_length is None:
        return body, _Binary(None)
    if isinstance(header_length, str):
        if not (header_length.isascii() and header_length.isdigit()):
            raise InvalidInput(f"{HEADER_LENGTH} must be a number of bytes, got {header_length!r}")
        header_length = int(header_length)
    if not 0 <= header_length <= len(body):
        raise InvalidInput(f"{HEADER_LENGTH} is {header_length}, but the body has only {len(body)} bytes")
    return body[:header_length], _Binary(memoryview(body)[header_length:])


def _tensor(tensor, signature: Signature, binary: _Binary) -> tuple[str, np.ndarray]:
    if not isinstance(tensor, dict):
        raise InvalidInput("each input must be an object with name, shape, datatype and data")
    name, shape, kind = tensor.get("name"), tensor.get("shape"), tensor.get("datatype")
    if not isinstance(name, str):
        raise InvalidInput("an input has no 'name'")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):  # not bool: true is 1
        raise InvalidInput(f"input '{name}': 'shape' must be a list of non-negative integers, got {shown(shape)}")
    dtype = check_input(name, str(kind), shape, signature)
    size = _parameter(tensor, "binary_data_size", int, f"input '{name}'")
    if size is not None:
        if "data" in tensor:
            raise InvalidInput(f"input '{name}' has both 'data' and a binary_data_size parameter; give one")
        return name, from_raw(name, str(kind), shape, binary.take(name, size))
    if "data" not in tensor:
        raise InvalidInput(f"input '{name}' has neither 'data' nor a binary_data_size parameter")
    try:
        if dtype == "string":
            flat = string_array(name, tensor["data"], _text).ravel()
        else:
            flat = np.asarray(tensor["data"], dtype=dtype).ravel()
    except (ValueError, TypeError, OverflowError) as e:
        raise InvalidInput(f"input '{name}': data cannot be read as {kind}: {e}") from None
    if flat.size != math.prod(shape):  # exact: numpy's int64 product wraps around
        raise InvalidInput(f"input '{name}': shape {shape} needs {math.prod(shape)} values, data has {flat.size}")
    return name, _reshape(name, flat, shape)


def _text(name: str, value) -> bytes:
    """A BYTES element of JSON data: a string (Triton's JSON has no other form)."""
    if not isinstance(value, str):
        raise InvalidInput(f"input '{name}': BYTES data must hold strings, got {shown(value)} ({type(value).__name__})")
    return value.encode()


def _reshape(name: str, flat: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    try:
        return flat.reshape(shape)
    except ValueError as e:  # numpy's limit, which counts nonzero dimensions even beside a 0
        raise InvalidInput(f"input '{name}': shape {list(shape)} cannot be held: {e}") from None


def from_raw(name: str, kind: str, shape: Sequence[int], raw: bytes | memoryview) -> np.ndarray:
    """An input from its binary form (kind a known datatype: check_input)."""
    count = math.prod(shape)
    if kind == "BYTES":
        elements = _bytes_elements(name, memoryview(raw))
        if len(elements) != count:
            raise InvalidInput(
                f"input '{name}': shape {list(shape)} needs {count} BYTES elements, the binary data has {len(elements)}"
            )
        flat = np.empty(count, dtype=object)
        flat[:] = elements
    else:
        dtype = np.dtype(DATATYPES[kind]).newbyteorder("<")
        if len(raw) != count * dtype.itemsize:
            raise InvalidInput(
                f"input '{name}': shape {list(shape)} of {kind} needs {count * dtype.itemsize} "
                f"bytes of binary data, got {len(raw)}"
            )
        flat = np.frombuffer(raw, dtype).astype(DATATYPES[kind], copy=False)
        if kind == "BOOL" and flat.view(np.uint8).max(initial=0) > 1:
            raise InvalidInput(f"input '{name}': BOOL binary data must hold bytes 0 and 1 only")
    return _reshape(name, flat, shape)


def _bytes_elements(name: str, raw: memoryview) -> list[bytes]:
    elements, offset = [], 0
    while offset < len(raw):
        if len(raw) - offset < 4:
            raise InvalidInput(f"input '{name}': its BYTES binary data ends inside an element's 4-byte length")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if size > len(raw) - offset:
            raise InvalidInput(f"input '{name}': a BYTES element of {size} bytes runs past the end of its binary data")
        elements.append(bytes(raw[offset : offset + size]))
        offset += size
    return elements


def to_raw(array: np.ndarray) -> tuple[str, bytes]:
    """An output's datatype and binary form."""
    if array.dtype == object or array.dtype.kind in "SU":
        parts: list[bytes] = []
        for value in array.ravel().tolist():
            value = value if isinstance(value, bytes) else str(value).encode()
            parts += (struct.pack("<I", len(value)), value)
        return "BYTES", b"".join(parts)
    kind = datatype(array.dtype.name)
    return kind, np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def write_infer(
    model: str, version: int, outputs: dict[str, np.ndarray], request: InferRequest, parameters: dict | None = None
) -> tuple[bytes, int | None]:
    """The response body (with the response's `parameters`, if any), and the length of its JSON
    header when binary outputs follow it (None: all JSON)."""
    tensors, chunks = [], []
    for name in request.outputs if request.outputs is not None else list(outputs):
        if request.binary(name):
            kind, raw = to_raw(outputs[name])
            tensors.append(
                {
                    "name": name,
                    "shape": list(outputs[name].shape),
                    "datatype": kind,
                    "parameters": {"binary_data_size": len(raw)},
                }
            )
            chunks.append(raw)
        else:
            tensors.append(_output(name, outputs[name]))
    response = _response(model, version, tensors, request.id)
    if parameters:
        response["parameters"] = parameters
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    return (b"".join([header, *chunks]), len(header)) if chunks else (header, None)


def _response(model: str, version: int, tensors: list[dict], request_id: str | None) -> dict:
    response = {"model_name": model, "model_version": str(version), "outputs": tensors}
    if request_id is not None:
        response["id"] = request_id
    return response


def _output(name: str, array: np.ndarray) -> dict:
    data: Any
    if array.dtype == object or array.dtype.kind == "S":
        kind, data = (
            "BYTES",
            [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else v for v in array.ravel().tolist()],
        )
    else:
        kind, data = datatype(array.dtype.name), array.ravel()
        if array.dtype.kind == "f" and not np.isfinite(data).all():
            # orjson would write null, which reads back as NaN; the standard encoder writes NaN,
            # Infinity and -Infinity bare, as Triton does and as read_infer reads them.
            data = orjson.Fragment(json.dumps(data.tolist(), allow_nan=True, separators=(",", ":")))
    return {"name": name, "shape": list(array.shape), "datatype": kind, "data": data}


def metadata(name: str, versions: list[int], signature: Signature) -> dict:
    return {
        "name": name,
        "versions": [str(v) for v in versions],
        "platform": "kiln_xla",
        "inputs": [_spec(s) for s in signature.inputs],
        "outputs": [_spec(s) for s in signature.outputs],
    }


def _spec(spec: TensorSpec) -> dict:
    """A tensor's metadata; the protocol has no unknown rank, so one is a single dynamic dimension, [-1]."""
    shape = [-1] if spec.shape is None else [-1 if d is None else d for d in spec.shape]
    return {"name": spec.name, "datatype": datatype(spec.dtype), "shape": shape}


def default_signature(engine) -> tuple[str, Signature]:
    """The signature the Open Inference Protocol, which has none, reaches: serving_default, or the
    only one."""
    if DEFAULT_SIGNATURE in engine.signatures:
        return DEFAULT_SIGNATURE, engine.signatures[DEFAULT_SIGNATURE]
    if len(engine.signatures) == 1:
        return next(iter(engine.signatures.items()))
    raise InvalidInput(
        f"the model has no {DEFAULT_SIGNATURE} signature, and several others "
        f"({', '.join(engine.signatures)}); name one with the request parameter signature_name"
    )


def oip_signature(engine, parameters: Mapping) -> tuple[str, Signature]:
    """An infer request's signature: the one its `signature_name` parameter names (Kiln's, after TF
    Serving's field: the Open Inference Protocol has no such notion), else default_signature's."""
    key = parameters.get("signature_name")
    if key is None:
        return default_signature(engine)
    if not isinstance(key, str):
        raise InvalidInput(f"the request: parameter signature_name must be a string, got {key!r}")
    return key, engine.signature(key)
