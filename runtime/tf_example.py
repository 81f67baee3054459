"""Dense features of serialized tf.Examples, as TensorFlow's ParseExample gives them, without TensorFlow.

The protos are parsed by the `protobuf` package, whose C parser (upb) makes this fast, from Kiln's
own copies of feature.proto and of example.proto read as its wire holds it (kiln/example_entries.proto:
the feature map as a list of entries, in order). TensorFlow's fast parser walks those entries from
the last: a key given twice takes its last value (an Example concatenated after its context: the
example's features win), and of several bad features the last on the wire is reported. Values,
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


@cache
def _entries_class():
    from runtime.protos import generated_module

    return generated_module("kiln.example_entries_pb2").ExampleEntries


def default_values(feature: DenseFeature) -> np.ndarray | None:
    """The feature's default as an array of its per-example shape, or None when it is required."""
    if feature.default is None:
        return None
    values = [base64.b64decode(v) for v in feature.default] if feature.dtype == "string" else feature.default
    return np.array(values, dtype=object if feature.dtype == "string" else feature.dtype).reshape(feature.shape)


def parse_dense(serialized: np.ndarray, features: tuple[DenseFeature, ...]) -> list[np.ndarray]:
    """For each feature, an array [len(serialized), *shape] of its values in each example, or
    InvalidInput worded as TensorFlow's InvalidArgument for the same input."""
    from google.protobuf.message import DecodeError

    new_entries = _entries_class()
    rows = len(serialized)
    outputs = [np.empty((rows, *f.shape), dtype=object if f.dtype == "string" else f.dtype) for f in features]
    defaults = [default_values(f) for f in features]
    wanted = {f.key.encode(): index for index, f in enumerate(features)}
    sizes = [int(np.prod(f.shape)) for f in features]
    for row, data in enumerate(serialized):
        entries = new_entries()
        try:
            entries.ParseFromString(data)
        except DecodeError:
            raise InvalidInput(f"Could not parse example input, value: '{_shown(data)}'") from None
        seen: set[bytes] = set()
        found = [False] * len(features)
        for entry in reversed(entries.features.feature):  # as TensorFlow: from the last, which wins
            if entry.key in seen:
                continue
            seen.add(entry.key)
            index = wanted.get(entry.key)
            kind = entry.value.WhichOneof("kind")
            if index is None or kind is None:  # not asked for; or no value list, which counts as missing
                continue
            feature = features[index]
            field, name = KINDS[feature.dtype]
            where = f"Name: <unknown>, Key: {feature.key}, Index: {row}."
            if kind != field:
                raise InvalidInput(f"{where}  Data types don't match. Data type: {NAMES[kind]} but expected "
                                   f"type: {name}")
            values = getattr(entry.value, kind).value
            if len(values) != sizes[index]:
                if feature.dtype == "string" and len(values) > sizes[index]:  # TensorFlow's wording for this
                    raise InvalidInput(f"{where}  Can't parse serialized Example.")
                counted = "bytes" if feature.dtype == "string" else name
                raise InvalidInput(f"{where}  Number of {counted} values != expected.  Values size: {len(values)} "
                                   f"but output shape: [{','.join(map(str, feature.shape))}]")
            outputs[index][row, ...] = np.array(values, dtype=outputs[index].dtype).reshape(feature.shape)
            found[index] = True
        for index, feature in enumerate(features):
            if found[index]:
                continue
            if defaults[index] is None:
                raise InvalidInput(f"Name: <unknown>, Feature: {feature.key} (data type: "
                                   f"{KINDS[feature.dtype][1]}) is required but could not be found.")
            outputs[index][row, ...] = defaults[index]
    return outputs


def _shown(data: bytes) -> str:
    """The start of an unparsable proto as TensorFlow shows it (its bytes, escaped)."""
    text = repr(bytes(data[:64]))[2:-1]
    return text + ("..." if len(data) > 64 else "")
