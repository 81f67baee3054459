"""TensorFlow Serving's JSON predict format: request bodies to arrays, outputs to response bodies.

Row format ("instances") adds a batch dimension and answers "predictions"; columnar ("inputs")
takes tensors as they are and answers "outputs". Binary strings travel as {"b64": ...}, and bare
NaN / Infinity / -Infinity are accepted and written, as the real server does.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import orjson
import simdjson

from runtime.errors import InvalidInput, shown
from runtime.manifest import Signature, TensorSpec
from runtime.version_policy import State

DEFAULT_SIGNATURE = "serving_default"  # TF Serving's kDefaultServingSignatureDefKey
# TF Serving's ModelVersionStatus states: a failed load is END with an error status.
REPORTED_STATE = {
    State.START: "START",
    State.LOADING: "LOADING",
    State.AVAILABLE: "AVAILABLE",
    State.UNLOADING: "UNLOADING",
    State.END: "END",
    State.ERROR: "END",
}
DTYPE_ENUM = {
    "float16": "DT_HALF",
    "bfloat16": "DT_BFLOAT16",
    "float32": "DT_FLOAT",
    "float64": "DT_DOUBLE",
    "int8": "DT_INT8",
    "int16": "DT_INT16",
    "int32": "DT_INT32",
    "int64": "DT_INT64",
    "uint8": "DT_UINT8",
    "uint16": "DT_UINT16",
    "uint32": "DT_UINT32",
    "uint64": "DT_UINT64",
    "bool": "DT_BOOL",
    "string": "DT_STRING",
    "complex64": "DT_COMPLEX64",
    "complex128": "DT_COMPLEX128",
}


@dataclass(frozen=True)
class PredictRequest:
    signature_name: str
    inputs: dict[str, np.ndarray]
    row_format: bool


NUMBER_BYTES = b"0123456789.-+eE \t\r\n"  # what JSON numbers and whitespace are made of


def skeleton(shape: tuple) -> bytes:
    """Nested JSON lists of this shape without their numbers and whitespace: (2, 2) -> b"[[,],[,]]"."""
    if not shape:
        return b""
    return b"[%b]" % b",".join([skeleton(shape[1:])] * shape[0])


def fixed_size(shape: tuple | None) -> int | None:
    """Values per row of an input whose shape beyond the batch is fixed (None for unknown rank)."""
    if shape is None:
        return None
    inner = shape[1:]
    return None if any(d is None for d in inner) else math.prod(inner)  # exact: numpy's int64 product wraps around


def row_shape(spec: TensorSpec) -> tuple[int, ...]:
    """The shape of one row of a tensor whose shape beyond the batch is fixed (fixed_size is not None
    for it; a state's, and a generative servable's tokens and logits, are so by the manifest's checks)."""
    assert spec.shape is not None and None not in spec.shape[1:], f"{spec.name} has a fixed shape"
    return tuple(size for size in spec.shape[1:] if size is not None)


def numeric_rows(text: bytes, shape: tuple | None, dtype: str) -> np.ndarray | None:
    """Rows of a fixed-shape numeric input written as nested JSON lists, parsed flat (flat_numbers)
    once their brackets are checked to nest exactly as the shape says (orjson building the nested
    lists and numpy walking them cost several times more); None when the text is anything else
    (strings, NaN, ragged rows), for the general path to parse and judge."""
    size = fixed_size(shape)
    if shape is None or size is None or not dtype.startswith("float"):  # integers: the general path refuses fractions
        return None
    brackets, row = text.translate(None, NUMBER_BYTES), skeleton(shape[1:]) or b""
    rows = (len(brackets) - 1) // (len(row) + 1) if row else 0
    if not row or rows < 1 or brackets != b"[%b]" % b",".join([row] * rows):
        return None
    try:
        numbers = flat_numbers(text)
    except (ValueError, TypeError):  # not JSON, or not all numbers: the general path says which
        return None
    return numbers.astype(dtype).reshape(rows, *shape[1:]) if len(numbers) == rows * size else None


def flat_numbers(text: bytes) -> np.ndarray:
    """Every number of nested JSON lists, in order, as float64: simdjson writes them straight into
    one buffer, where orjson made a Python float of each for numpy to read back (that took twice as
    long for a 32x32x3 image). It does not check that the lists nest evenly: numeric_rows has. A
    fresh parser per call: it is cheap, and a parser must not be shared between threads."""
    document = simdjson.Parser().parse(text)
    if not isinstance(document, simdjson.Array):
        raise TypeError("not a list")
    return np.frombuffer(document.as_buffer(of_type="d"), np.float64)


def instances_text(body: bytes) -> bytes | None:
    """X of a body that is {"instances": X} and nothing else (whitespace aside), unparsed."""
    text = body.strip()
    if not (text.startswith(b"{") and text.endswith(b"}")):
        return None
    text = text[1:-1].strip()
    if not text.startswith(b'"instances"'):
        return None
    text = text[len(b'"instances"') :].lstrip()
    return text[1:].strip() if text.startswith(b":") else None


def fast_predict(text: bytes, signature: Signature) -> PredictRequest | None:
    """The instances_text of a body, when it is rows of numbers for a single-input signature (as
    most image and tabular clients send), decoded without building its nested lists; None for
    anything else."""
    if len(signature.inputs) != 1:
        return None
    (spec,) = signature.inputs
    rows = numeric_rows(text, spec.shape, spec.dtype)
    return None if rows is None else PredictRequest(DEFAULT_SIGNATURE, {spec.name: rows}, True)


def loads(body: bytes | str):
    """Parse JSON with orjson; only a body that orjson refuses is retried with the standard
    parser, which also takes the bare NaN and Infinity that TensorFlow Serving clients send."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as first:
        text = body if isinstance(body, str) else _utf8(body)
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            raise InvalidInput(f"malformed JSON: {first}") from None
        if (text is body or "\\u" in text) and _lone_surrogate(value):
            raise InvalidInput(
                "malformed JSON: a string holds a lone UTF-16 surrogate (such as \\ud800), which is not Unicode text"
            ) from None
        return value


def _utf8(body: bytes) -> str:
    """The body as strict UTF-8: the standard parser would take UTF-16 or UTF-32 too, and decode
    UTF-8-encoded surrogates (ED A0 80) into strings that no encoder writes back."""
    try:
        return bytes(body).decode()
    except UnicodeDecodeError as e:
        raise InvalidInput(
            f"malformed JSON: the body must be UTF-8 text; bytes {e.start} to {e.end - 1} "
            f"({bytes(body[e.start : e.start + 3]).hex(' ')}) are not ({e.reason})"
        ) from None


def _lone_surrogate(value) -> bool:
    """Whether any string holds one: the standard parser takes "\\ud800", and every encoder (orjson,
    protobuf, UTF-8) refuses it later, far from the request."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode()
                except UnicodeEncodeError:
                    return True
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
    return False


def read_predict(body: bytes | str | dict) -> tuple[str, dict]:
    """The signature name and the parsed body (or one parsed already, as Lambda's events are),
    checking the envelope before any signature lookup."""
    request = body if isinstance(body, dict) else loads(body)
    if not isinstance(request, dict):
        raise InvalidInput(f"the request body must be a JSON object, got {type(request).__name__}")
    name = request.get("signature_name", DEFAULT_SIGNATURE)
    if not isinstance(name, str):
        raise InvalidInput("'signature_name' must be a string")
    if ("instances" in request) == ("inputs" in request):
        raise InvalidInput(
            "the request must have exactly one of 'instances' (row format) or 'inputs' (columnar format)"
        )
    return name, request


def decode_predict(name: str, request: dict, signature: Signature) -> PredictRequest:
    """Arrays by input name, converted to the signature's dtypes."""
    names = [spec.name for spec in signature.inputs]
    if "instances" in request:
        instances = request["instances"]
        if not isinstance(instances, list) or not instances:
            raise InvalidInput("'instances' must be a non-empty list")
        if _named(instances[0]):
            if not all(_named(i) for i in instances):
                raise InvalidInput("'instances' must be all objects or all values, not a mix")
            keys = set(instances[0])
            if any(set(i) != keys for i in instances):
                raise InvalidInput("every instance must name the same inputs")
            columns = {key: [i[key] for i in instances] for key in keys}
        else:
            columns = {_only_input(names, "instances"): instances}
        return PredictRequest(name, _arrays(columns, signature), True)
    inputs = request["inputs"]
    if isinstance(inputs, dict) and not (len(names) == 1 and "b64" in inputs and len(inputs) == 1):
        columns = inputs
    else:
        columns = {_only_input(names, "inputs"): inputs}
    return PredictRequest(name, _arrays(columns, signature), False)


def _named(value) -> bool:
    """An object of tensors by input name; {"b64": "..."} is one binary value, as in TF Serving."""
    return isinstance(value, dict) and not (set(value) == {"b64"} and isinstance(value["b64"], str))


def _only_input(names: list[str], key: str) -> str:
    if len(names) != 1:
        raise InvalidInput(
            f"'{key}' must be an object keyed by input name: the signature takes "
            f"{len(names)} inputs ({', '.join(names)})"
        )
    return names[0]


def _arrays(columns: dict, signature: Signature) -> dict[str, np.ndarray]:
    arrays = {}
    for key, value in columns.items():
        spec = signature.input(key)
        if spec is None:  # the engine names unknown inputs along with the expected ones
            arrays[key] = np.asarray(value, dtype=object)
            continue
        try:
            if spec.dtype == "string":
                arrays[key] = string_array(key, value, _binary)
            else:
                arrays[key] = np.array(value, dtype=spec.dtype)
        except (ValueError, TypeError, OverflowError) as e:
            raise InvalidInput(f"input '{key}' cannot be read as a {spec.dtype} tensor of one shape: {e}") from None
        except RecursionError:
            raise InvalidInput(f"input '{key}' is nested too deeply") from None
    return arrays


def string_array(name: str, value, leaf: Callable[[str, object], bytes]) -> np.ndarray:
    """A string input's tensor from a value or nested lists of them, each made bytes by `leaf`
    (which refuses what the protocol does not allow). Rows of different lengths are refused as
    numpy refuses them for numbers: in an object array they would stay lists, which no engine runs."""

    def walk(item):
        return [walk(v) for v in item] if isinstance(item, list) else leaf(name, item)

    array = np.array(walk(value), dtype=object)
    if any(isinstance(v, list) for v in array.flat):
        raise InvalidInput(
            f"input '{name}' cannot be read as a string tensor of one shape: its rows have different lengths"
        )
    return array


def _binary(name: str, value) -> bytes:
    """A TF Serving string value: text, or binary data as {"b64": "..."}."""
    if isinstance(value, str):
        return value.encode()
    if not isinstance(value, dict):
        raise InvalidInput(
            f'input \'{name}\' must hold strings or {{"b64": "..."}} objects, got '
            f"{shown(value)} ({type(value).__name__})"
        )
    return b64_bytes(f"input '{name}'", value)


def b64_bytes(where: str, value) -> bytes:
    """The bytes of a binary value, TF Serving's {"b64": "<base64>"}; `where` names it in errors."""
    if not isinstance(value, dict) or set(value) != {"b64"} or not isinstance(value["b64"], str):
        raise InvalidInput(f'{where}: a binary value must be {{"b64": "<base64 string>"}}, got {shown(value)}')
    try:
        return base64.b64decode(value["b64"], validate=True)
    except (binascii.Error, ValueError) as e:  # ValueError: text that is not ASCII
        raise InvalidInput(f"{where}: invalid base64 in a b64 value: {e}") from None


def encode_predict(outputs: dict[str, np.ndarray], row_format: bool) -> bytes:
    """ "predictions" (per row) or "outputs" (per tensor); one output is unnamed, several named."""
    body = _body({name: _jsonable(name, array) for name, array in outputs.items()}, row_format)
    if any(a.dtype.kind == "f" and not np.isfinite(a).all() for a in outputs.values()):
        # orjson would write null; the standard encoder writes NaN and Infinity as TF Serving does.
        return json.dumps(predict_values(outputs, row_format), allow_nan=True, separators=(",", ":")).encode()
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def _body(values: dict, row_format: bool) -> dict:
    if row_format:
        if len(values) == 1:
            return {"predictions": next(iter(values.values()))}
        rows = len(next(iter(values.values())))
        return {"predictions": [{name: v[i] for name, v in values.items()} for i in range(rows)]}
    return {"outputs": next(iter(values.values())) if len(values) == 1 else values}


# Strict JSON (Lambda's and Step Functions' results, objects written for records) has no NaN or Infinity:
# there they are these strings, as in proto3's JSON mapping (protobuf's and Spark's JSON readers take them as floats).
NON_FINITE_STRINGS = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def predict_values(outputs: dict[str, np.ndarray], row_format: bool, *, strict: bool = False) -> dict:
    """encode_predict's body as Python values, for callers that write JSON of their own."""
    return _body({name: plain(name, array, strict=strict) for name, array in outputs.items()}, row_format)


def plain(name: str, array: np.ndarray, *, strict: bool = False):
    """An output as Python values, numbers as encode_predict writes them (float32 0.1 stays 0.1, not
    0.10000000149011612: orjson's shortest form, read back); NaN and ±Infinity as floats, or with
    `strict` as NON_FINITE_STRINGS."""
    value = _jsonable(name, array)
    if isinstance(value, list):
        return value
    if isinstance(value, np.ndarray):
        value = np.ascontiguousarray(value)  # orjson writes C-ordered arrays only
    result = orjson.loads(orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY))  # NaN and Infinity: null
    if array.dtype.kind != "f" or np.isfinite(array).all():
        return result
    token = (lambda x: NON_FINITE_STRINGS[str(x)]) if strict else float
    if array.ndim == 0:
        return token(array[()])
    for index in zip(*np.nonzero(~np.isfinite(array))):
        inner = result
        for i in index[:-1]:
            inner = inner[i]
        inner[index[-1]] = token(array[index])
    return result


def _jsonable(name: str, array: np.ndarray):
    """Strings become text, or {"b64": ...} for outputs named *_bytes; numbers stay arrays, but a
    scalar becomes a numpy scalar (orjson refuses 0-d arrays)."""
    if array.dtype == object or array.dtype.kind == "S":
        return _map_strings(array.tolist(), name.endswith("_bytes"))
    return array if array.ndim else array[()]


def _map_strings(value, as_b64: bool):
    if isinstance(value, list):
        return [_map_strings(v, as_b64) for v in value]
    if as_b64:
        return {"b64": base64.b64encode(value).decode()}
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


def model_status(versions) -> dict:
    """TF Serving's GetModelStatusResponse as JSON, from the repository's version statuses (REST answers
    it, gRPC parses it into its message)."""
    return {
        "model_version_status": [
            {
                "version": str(v.version),
                "state": REPORTED_STATE[v.state],
                "status": {"error_code": "UNKNOWN" if v.error else "OK", "error_message": v.error},
            }
            for v in versions
        ]
    }


def signature_def(signature: Signature) -> dict:
    """TF Serving's SignatureDef as JSON (the REST metadata; gRPC parses the same document)."""
    return {
        "inputs": {s.name: tensor_info(s) for s in signature.inputs},
        "outputs": {s.name: tensor_info(s) for s in signature.outputs},
        "method_name": signature.method,
    }


def tensor_info(spec: TensorSpec) -> dict:
    """TF Serving's TensorInfo as JSON; a shape of unknown rank is no dims and unknown_rank true."""
    dims = [{"size": str(-1 if d is None else d), "name": ""} for d in spec.shape or ()]
    return {
        "dtype": DTYPE_ENUM.get(spec.dtype, "DT_INVALID"),
        "name": spec.name,
        "tensor_shape": {"dim": dims, "unknown_rank": spec.shape is None},
    }
