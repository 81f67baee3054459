"""The Open Inference Protocol's (KServe v2) JSON tensors: infer requests to arrays, outputs to
responses, and model metadata. A tensor is {name, shape, datatype, data}, data flat in row-major
order (nested lists are accepted too)."""

from __future__ import annotations

import numpy as np

from runtime.codecs.tfserving import loads
from runtime.errors import InvalidInput, Unsupported
from runtime.manifest import Signature, TensorSpec

DATATYPES = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
             "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64", "FP16": "float16",
             "FP32": "float32", "FP64": "float64", "BYTES": "string"}
DATATYPE_OF = {dtype: name for name, dtype in DATATYPES.items()}


def datatype(dtype: str) -> str:
    if dtype not in DATATYPE_OF:
        raise Unsupported(f"dtype {dtype} has no Open Inference Protocol datatype")
    return DATATYPE_OF[dtype]


def decode_infer(body: bytes, signature: Signature) -> tuple[dict[str, np.ndarray], list[str] | None, str | None]:
    """(inputs by name, requested output names or None for all, request id)."""
    request = loads(body)
    if not isinstance(request, dict):
        raise InvalidInput("the infer request must be a JSON object")
    tensors = request.get("inputs")
    if not isinstance(tensors, list) or not tensors:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")
    inputs = {}
    for tensor in tensors:
        name, array = _tensor(tensor, signature)
        if name in inputs:
            raise InvalidInput(f"input '{name}' is given twice")
        inputs[name] = array
    requested = request.get("outputs")
    names = None
    if requested is not None:
        if not isinstance(requested, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                      for o in requested):
            raise InvalidInput("'outputs' must be a list of {\"name\": ...} objects")
        names = [o["name"] for o in requested]
        known = {spec.name for spec in signature.outputs}
        if unknown := [n for n in names if n not in known]:
            raise InvalidInput(f"unknown output(s) {', '.join(unknown)}; the model has {', '.join(sorted(known))}")
    request_id = request.get("id")
    return inputs, names, request_id if isinstance(request_id, str) else None


def _tensor(tensor, signature: Signature) -> tuple[str, np.ndarray]:
    if not isinstance(tensor, dict):
        raise InvalidInput("each input must be an object with name, shape, datatype and data")
    name, shape, kind = tensor.get("name"), tensor.get("shape"), tensor.get("datatype")
    if not isinstance(name, str):
        raise InvalidInput("an input has no 'name'")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InvalidInput(f"input '{name}': 'shape' must be a list of non-negative integers")
    if kind not in DATATYPES:
        raise InvalidInput(f"input '{name}': unknown datatype {kind!r}; expected one of {', '.join(DATATYPES)}")
    if "data" not in tensor:
        raise InvalidInput(f"input '{name}' has no 'data' (the binary data extension is not supported)")
    dtype = DATATYPES[kind]
    try:
        if dtype == "string":
            flat = np.array([v.encode() if isinstance(v, str) else v for v in np.ravel(np.array(tensor["data"], dtype=object))],
                            dtype=object)
        else:
            flat = np.asarray(tensor["data"], dtype=dtype).ravel()
    except (ValueError, TypeError, OverflowError) as e:
        raise InvalidInput(f"input '{name}': data cannot be read as {kind}: {e}") from None
    if flat.size != int(np.prod(shape, dtype=np.int64)):
        raise InvalidInput(f"input '{name}': shape {shape} needs {int(np.prod(shape))} values, data has {flat.size}")
    spec = signature.input(name)
    if spec is not None and spec.dtype != dtype:
        raise InvalidInput(f"input '{name}' must have datatype {datatype(spec.dtype)}, got {kind}")
    return name, flat.reshape(shape)


def encode_infer(model: str, version: int, outputs: dict[str, np.ndarray], names: list[str] | None,
                 request_id: str | None) -> dict:
    chosen = names if names is not None else list(outputs)
    response = {"model_name": model, "model_version": str(version),
                "outputs": [_output(name, outputs[name]) for name in chosen]}
    if request_id is not None:
        response["id"] = request_id
    return response


def _output(name: str, array: np.ndarray) -> dict:
    if array.dtype == object or array.dtype.kind == "S":
        kind, data = "BYTES", [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else v
                               for v in array.ravel().tolist()]
    else:
        kind, data = datatype(array.dtype.name), array.ravel()
    return {"name": name, "shape": list(array.shape), "datatype": kind, "data": data}


def metadata(name: str, versions: list[int], signature: Signature) -> dict:
    return {"name": name, "versions": [str(v) for v in versions], "platform": "kiln_xla",
            "inputs": [_spec(s) for s in signature.inputs], "outputs": [_spec(s) for s in signature.outputs]}


def _spec(spec: TensorSpec) -> dict:
    return {"name": spec.name, "datatype": datatype(spec.dtype), "shape": [-1 if d is None else d for d in spec.shape]}
