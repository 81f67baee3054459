"""Dense features of serialized tf.Examples, as TensorFlow's ParseExample gives them, without TensorFlow.

The protos are parsed by the `protobuf` package (example.proto and feature.proto are Kiln's own
copies, generated at build time like the other protos): its C parser (upb) is what makes this fast,
and it merges repeated fields and map entries as TensorFlow's fast parser does (a key given twice:
the last wins; an Example concatenated after its context: the example's features win). Values,
defaults, and the errors for a missing required feature, a wrong value type or count, and an
unparsable proto follow TensorFlow's (tensorflow/core/util/example_proto_fast_parsing.cc), so a
client sees the same meaning from Kiln as from TF Serving. Sparse and ragged features are not
handled here (the compiler leaves such signatures to the saved-model engine).
"""

from __future__ import annotations

import base64
from functools import cache

import numpy as np

from runtime.errors import InvalidInput
from runtime.manifest import DenseFeature

# The Feature oneof's field for each dtype, and TensorFlow's name for it in its messages.
KINDS = {"float32": ("float_list", "float"), "int64": ("int64_list", "int64"), "string": ("bytes_list", "string")}
NAMES = {"float_list": "float", "int64_list": "int64", "bytes_list": "string"}


@cache
def example_class():
    from runtime.protos import generated_module

    return generated_module("tensorflow.core.example.example_pb2").Example


def default_values(feature: DenseFeature) -> np.ndarray | None:
    """The feature's default as an array of its per-example shape, or None when it is required."""
    if feature.default is None:
        return None
    values = [base64.b64decode(v) for v in feature.default] if feature.dtype == "string" else feature.default
    return np.array(values, dtype=object if feature.dtype == "string" else feature.dtype).reshape(feature.shape)


def parse_dense(serialized: np.ndarray, features: tuple[DenseFeature, ...]) -> list[np.ndarray]:
    """For each feature, an array [len(serialized), *shape] of its values in each example, or
    InvalidInput worded as TensorFlow's InvalidArgument for the same input."""
    new_example = example_class()
    rows = len(serialized)
    outputs = [np.empty((rows, *f.shape), dtype=object if f.dtype == "string" else f.dtype) for f in features]
    defaults = [default_values(f) for f in features]
    sizes = [int(np.prod(f.shape)) for f in features]
    from google.protobuf.message import DecodeError

    for row, data in enumerate(serialized):
        example = new_example()
        try:
            example.ParseFromString(data)
        except DecodeError:
            raise InvalidInput(f"Could not parse example input, value: '{_shown(data)}'") from None
        present = example.features.feature
        for feature, output, default, size in zip(features, outputs, defaults, sizes):
            found = present.get(feature.key)
            kind = found.WhichOneof("kind") if found is not None else None
            if kind is None:  # absent, or present with no value list: TensorFlow treats both as missing
                if default is None:
                    raise InvalidInput(f"Name: <unknown>, Feature: {feature.key} (data type: "
                                       f"{KINDS[feature.dtype][1]}) is required but could not be found.")
                output[row, ...] = default
                continue
            field, name = KINDS[feature.dtype]
            where = f"Name: <unknown>, Key: {feature.key}, Index: {row}."
            if kind != field:
                raise InvalidInput(f"{where}  Data types don't match. Data type: {NAMES[kind]} but expected "
                                   f"type: {name}")
            values = getattr(found, kind).value
            if len(values) != size:
                if feature.dtype == "string":  # TensorFlow's own wording for this case
                    raise InvalidInput(f"{where}  Can't parse serialized Example.")
                raise InvalidInput(f"{where}  Number of {name} values != expected.  Values size: {len(values)} "
                                   f"but output shape: [{', '.join(map(str, feature.shape))}]")
            output[row, ...] = np.array(values, dtype=output.dtype).reshape(feature.shape)
    return outputs


def _shown(data: bytes) -> str:
    """The start of an unparsable proto as TensorFlow shows it (its bytes, escaped)."""
    text = repr(bytes(data[:64]))[2:-1]
    return text + ("..." if len(data) > 64 else "")
