"""The Open Inference Protocol's gRPC messages (inference.ModelInferRequest and the rest, the file
tritonclient.grpc ships: runtime/protos/grpc_service.proto) to arrays and back. Pure functions over
the generated messages; grpc itself is the handler's (handlers/oip_grpc.py).

An input's data comes either in its `contents` (typed repeated fields; FP16 has none) or, for every
input at once, in the request's `raw_input_contents` (what tritonclient sends): the binary form of
runtime.codecs.oip (little-endian, row-major; BYTES length-prefixed). Outputs always go back in
`raw_output_contents`, one per output in order, which tritonclient's as_numpy reads. Datatypes,
shapes and names are checked against the signature as the REST codec checks them, with the same
messages; metadata are the REST codec's documents in their message form.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from google.protobuf import json_format

from runtime.codecs import oip
from runtime.errors import InvalidInput
from runtime.manifest import Signature
from runtime.protos import generated_module

_service = generated_module("grpc_service_pb2")

# The InferTensorContents field of each datatype, and the dtype it holds its values in.
CONTENTS = {
    "BOOL": ("bool_contents", "bool"),
    "INT8": ("int_contents", "int32"),
    "INT16": ("int_contents", "int32"),
    "INT32": ("int_contents", "int32"),
    "INT64": ("int64_contents", "int64"),
    "UINT8": ("uint_contents", "uint32"),
    "UINT16": ("uint_contents", "uint32"),
    "UINT32": ("uint_contents", "uint32"),
    "UINT64": ("uint64_contents", "uint64"),
    "FP32": ("fp32_contents", "float32"),
    "FP64": ("fp64_contents", "float64"),
    "BYTES": ("bytes_contents", None),
}


def version(text: str) -> int | None:
    """A request's model_version: "" for the newest available, or a version number."""
    if not text:
        return None
    if not (text.isascii() and text.isdigit()):
        raise InvalidInput(f"model_version must be a version number, got {text!r}")
    return int(text)


def decode_infer(request: Any, signature: Signature) -> tuple[dict[str, np.ndarray], list[str] | None]:
    """A ModelInferRequest's (inputs by name, requested output names or None for all)."""
    if not request.inputs:
        raise InvalidInput("the ModelInferRequest has no inputs")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            f"give every input's data there, in input order, or none"
        )
    inputs = {}
    for index, tensor in enumerate(request.inputs):
        name, shape = tensor.name, list(tensor.shape)
        if any(d < 0 for d in shape):
            raise InvalidInput(f"input '{name}': shape {shape} has a negative dimension")
        dtype = oip.check_input(name, tensor.datatype, shape, signature)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(
                    f"input '{name}' has contents, but the request gives raw_input_contents; "
                    f"give every input's data one way"
                )
            array = oip.from_raw(name, tensor.datatype, shape, raw[index])
        else:
            array = _from_contents(name, tensor, dtype, shape)
        if name in inputs:
            raise InvalidInput(f"input '{name}' is given twice")
        inputs[name] = array
    names = [output.name for output in request.outputs] or None
    if names is not None:
        oip.check_outputs(names, signature)
    return inputs, names


def request_parameters(request: Any) -> dict:
    """A ModelInferRequest's parameters as plain values (each InferParameter's one set field)."""
    return {
        key: getattr(value, value.WhichOneof("parameter_choice")) if value.WhichOneof("parameter_choice") else None
        for key, value in request.parameters.items()
    }


def _from_contents(name: str, tensor: Any, dtype: str, shape: list[int]) -> np.ndarray:
    if tensor.datatype not in CONTENTS:
        raise InvalidInput(f"input '{name}': {tensor.datatype} data can only be sent in raw_input_contents")
    field, held = CONTENTS[tensor.datatype]
    values = getattr(tensor.contents, field)
    if len(values) != math.prod(shape):
        raise InvalidInput(
            f"input '{name}': shape {shape} needs {math.prod(shape)} values, contents.{field} has {len(values)}"
        )
    if held is None:
        flat = np.empty(len(values), dtype=object)
        flat[:] = list(values)
    else:
        wide = np.array(values, dtype=held)
        flat = wide.astype(dtype)
        if wide.dtype.kind in "iu" and not np.array_equal(flat, wide):
            raise InvalidInput(f"input '{name}': contents.{field} has values out of {tensor.datatype}'s range")
    return flat.reshape(shape)


def encode_infer(
    model: str, model_version: int, outputs: dict[str, np.ndarray], names: list[str] | None, request_id: str
) -> Any:
    """A ModelInferResponse holding the outputs asked for (None: all) in raw_output_contents."""
    response = _service.ModelInferResponse(model_name=model, model_version=str(model_version), id=request_id)
    for name in names if names is not None else outputs:
        array = outputs[name]
        kind, raw = oip.to_raw(array)
        response.outputs.add(name=name, datatype=kind, shape=array.shape)
        response.raw_output_contents.append(raw)
    return response


def server_metadata(kiln_version: str) -> Any:
    return json_format.ParseDict(oip.server_metadata(kiln_version), _service.ServerMetadataResponse())


def model_metadata(name: str, versions: list[int], signature: Signature) -> Any:
    return json_format.ParseDict(oip.metadata(name, versions, signature), _service.ModelMetadataResponse())
