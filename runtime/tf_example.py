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
from functools import cache, lru_cache

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
def _entries_classes():
    from runtime.protos import generated_module

    module = generated_module("kiln.example_entries_pb2")
    return module.ExampleEntries, module.ExampleEntriesBatch


def default_values(feature: DenseFeature) -> np.ndarray | None:
    """The feature's default as an array of its per-example shape, or None when it is required."""
    if feature.default is None:
        return None
    values = [base64.b64decode(str(v)) for v in feature.default] if feature.dtype == "string" else feature.default
    return np.array(values, dtype=object if feature.dtype == "string" else feature.dtype).reshape(feature.shape)


def parse_dense(serialized: np.ndarray, features: tuple[DenseFeature, ...]) -> list[np.ndarray]:
    """For each feature, an array [len(serialized), *shape] of its values in each example, or
    InvalidInput worded as TensorFlow's InvalidArgument for the same input.

    The batch is parsed in one call (each example framed as a field of ExampleEntriesBatch), and
    each example's features read through a dict of its entries (the last of a key wins); only an
    example with something wrong is walked entry by entry, to report what TensorFlow reports.
    """
    rows = len(serialized)
    wanted = [(f.key.encode(), KINDS[f.dtype][0], int(np.prod(f.shape))) for f in features]
    columns: list[list] = [[] for _ in features]
    for row, example in enumerate(_parse_batch(serialized)):
        entries = {entry.key: entry.value for entry in example.features.feature}
        for index, (key, field, size) in enumerate(wanted):
            value = entries.get(key)
            kind = value.WhichOneof("kind") if value is not None else None
            if kind is None:  # absent, or no value list: TensorFlow counts both as missing
                if features[index].default is None:
                    _raise_first_problem(example, features, row)
                columns[index].append(None)
                continue
            values = getattr(value, kind).value
            if kind != field or len(values) != size:
                _raise_first_problem(example, features, row)
            columns[index].append(values)
    return [_column(feature, column, rows) for feature, column in zip(features, columns)]


def _parse_batch(serialized: np.ndarray):
    """The examples' entries, parsed in one call; an unparsable example is refused as TensorFlow does."""
    from google.protobuf.message import DecodeError

    entries_class, batch_class = _entries_classes()
    framed = b"".join(b"\n" + _varint(len(data)) + data for data in serialized)
    batch = batch_class()
    try:
        batch.ParseFromString(framed)
    except DecodeError:
        for data in serialized:  # which one: TensorFlow names the first
            try:
                entries_class().ParseFromString(data)
            except DecodeError:
                raise InvalidInput(f"Could not parse example input, value: '{_shown(data)}'") from None
        raise
    return batch.examples


@lru_cache(maxsize=4096)  # examples of a batch mostly share a few lengths
def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _column(feature: DenseFeature, values: list, rows: int) -> np.ndarray:
    """One feature's values of every example (None: the default) as [rows, *shape]."""
    dtype = object if feature.dtype == "string" else feature.dtype
    default = default_values(feature)
    if all(v is not None for v in values):
        flat = [item for value in values for item in value]
        return np.array(flat, dtype=dtype).reshape(rows, *feature.shape)
    out = np.empty((rows, *feature.shape), dtype=dtype)
    for row, value in enumerate(values):
        out[row, ...] = default if value is None else np.array(list(value), dtype=dtype).reshape(feature.shape)
    return out


def _raise_first_problem(example, features: tuple[DenseFeature, ...], row: int) -> None:
    """Raise what TensorFlow reports for this example: walking its entries from the last (the last
    of a key wins), the first wanted feature of the wrong type or count; else a required feature
    that is missing."""
    wanted = {f.key.encode(): f for f in features}
    found, seen = set(), set()
    for entry in reversed(example.features.feature):
        if entry.key in seen:
            continue
        seen.add(entry.key)
        feature, kind = wanted.get(entry.key), entry.value.WhichOneof("kind")
        if feature is None or kind is None:
            continue
        field, name = KINDS[feature.dtype]
        where = f"Name: <unknown>, Key: {feature.key}, Index: {row}."
        if kind != field:
            raise InvalidInput(f"{where}  Data types don't match. Data type: {NAMES[kind]} but expected type: {name}")
        size, values = int(np.prod(feature.shape)), getattr(entry.value, kind).value
        if len(values) != size:
            if feature.dtype == "string" and len(values) > size:  # TensorFlow's wording for this
                raise InvalidInput(f"{where}  Can't parse serialized Example.")
            counted = "bytes" if feature.dtype == "string" else name
            raise InvalidInput(
                f"{where}  Number of {counted} values != expected.  Values size: {len(values)} "
                f"but output shape: [{','.join(map(str, feature.shape))}]"
            )
        found.add(feature.key)
    for feature in features:
        if feature.key not in found and feature.default is None:
            raise InvalidInput(
                f"Name: <unknown>, Feature: {feature.key} (data type: "
                f"{KINDS[feature.dtype][1]}) is required but could not be found."
            )


def _shown(data: bytes) -> str:
    """The start of an unparsable proto as TensorFlow shows it (its bytes, escaped)."""
    text = repr(bytes(data[:64]))[2:-1]
    return text + ("..." if len(data) > 64 else "")
