"""Dense features of serialized tf.Examples, as TensorFlow's ParseExample gives them, without TensorFlow.

The protobuf reader (parse_with_protobuf) parses them with the `protobuf` package, from Kiln's
own copies of feature.proto and of example.proto read as its wire holds it (kiln/example_entries.proto:
the feature map as a list of entries, in order). TensorFlow's fast parser walks those entries from
the last: a key given twice takes its last value (an Example concatenated after its context: the
example's features win), and of several bad features the last on the wire is reported. Values,
defaults, and the errors for a missing required feature, a wrong value type or count, and an
unparsable proto follow TensorFlow's (tensorflow/core/util/example_proto_fast_parsing.cc), so a
client sees the same meaning from Kiln as from TF Serving. Sparse and ragged features are not
handled here (the compiler leaves such signatures to the saved-model engine).

Two readers, one answer. Reading values out of protobuf's message objects (a Python object for every
entry, feature and list) made parsing most of Kiln's time on wide_deep's batch of 32 tf.Examples,
and the whole call no faster than TensorFlow's graph. So parse_dense first reads the batch straight
from its bytes, in the encoding every serializer writes (each map entry its key then its value, each
list one packed run or one run of strings): about 2.4x faster; end to end, 2.6x TensorFlow's calls
per second against 1.1x through the protobuf reader (one process, alternating rounds). Anything else
it meets (another field order, unknown fields, unpacked values, a wrong type or count, a missing
required feature, a truncated proto) sends the whole batch to the protobuf reader, which gives the
values or the error; on what the direct reader accepts, both agree (tests/test_host_program.py).
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
    InvalidInput worded as TensorFlow's InvalidArgument for the same input."""
    try:
        return _read_common(serialized.tolist(), features)
    except _Uncommon:
        return parse_with_protobuf(serialized, features)


def parse_with_protobuf(serialized: np.ndarray, features: tuple[DenseFeature, ...]) -> list[np.ndarray]:
    """parse_dense through protobuf's parser, for any encoding, and the errors.

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


class _Uncommon(Exception):
    """Something the direct reader leaves to protobuf's (see the module docstring)."""


# The tags on the wire of the Feature oneof's lists (fields 1-3, length-delimited), by dtype.
_LIST_TAGS = {"string": 0x0A, "float32": 0x12, "int64": 0x1A}


@lru_cache(maxsize=256)
def _plan(features: tuple[DenseFeature, ...]) -> tuple[frozenset[bytes], tuple[tuple, ...]]:
    """The keys to read, and per feature (key, dtype, value count, float header, default): a
    float32 feature of n values is one Feature of a fixed layout, `header` and then 4n bytes, its
    default that whole Feature; other defaults are lists of values."""
    plan = []
    for feature in features:
        size, default = int(np.prod(feature.shape)), default_values(feature)
        header = b""
        if feature.dtype == "float32":
            packed = b"\n" + _varint(4 * size) if size else b""
            header = b"\x12" + _varint(len(packed) + 4 * size) + packed
        fill: bytes | list | None = None
        if default is not None:
            fill = header + default.astype("<f4").tobytes() if header else default.ravel().tolist()
        plan.append((feature.key.encode(), feature.dtype, size, header, fill))
    return frozenset(entry[0] for entry in plan), tuple(plan)


def _read_common(serialized: list[bytes], features: tuple[DenseFeature, ...]) -> list[np.ndarray]:
    """parse_dense over bytes in the common encoding, or _Uncommon."""
    wanted, plan = _plan(features)
    rows = len(serialized)
    try:
        found = [_wanted_features(data, wanted) for data in serialized]
        return [
            _common_column(entry, [example.get(entry[0]) for example in found], rows).reshape(rows, *feature.shape)
            for feature, entry in zip(features, plan)
        ]
    except IndexError:  # a length past the end
        raise _Uncommon from None


def _varint_at(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at pos (of any length, up to 64 bits) and the position after it."""
    value = shift = 0
    while shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if value >> 64:
                break
            return value, pos
        shift += 7
    raise _Uncommon


def _delimited(data: bytes, pos: int, tag: int) -> tuple[int, int]:
    """Where the content of the length-delimited field `tag` at pos starts and ends."""
    if data[pos] != tag:
        raise _Uncommon
    size = data[pos + 1]
    if size < 0x80:
        return pos + 2, pos + 2 + size
    size, pos = _varint_at(data, pos + 1)
    return pos, pos + size


def _wanted_features(data: bytes, wanted: frozenset[bytes]) -> dict[bytes, bytes]:
    """The serialized Feature of each wanted key in the example (the last of a key wins); every
    other Feature is checked, as protobuf's parser would, and skipped."""
    found: dict[bytes, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:  # the Features fields (an example after its context: several)
        pos, stop = _delimited(data, pos, 0x0A)
        if stop > end:
            raise _Uncommon
        while pos < stop:  # each map entry: 0x0A length, its key (0x0A length bytes), its Feature (0x12 length)
            entry_size, key_size = data[pos + 1], data[pos + 3]
            if data[pos] == data[pos + 2] == 0x0A and entry_size < 0x80 and key_size < 0x80:  # a short entry
                entry_end = pos + 2 + entry_size
                pos += 4 + key_size
                key = data[pos - key_size : pos]
            else:
                pos, entry_end = _delimited(data, pos, 0x0A)
                start, pos = _delimited(data, pos, 0x0A)
                key = data[start:pos]
            if entry_end > stop or data[pos] != 0x12:
                raise _Uncommon
            size = data[pos + 1]
            pos += 2
            if size > 0x7F:
                size, pos = _varint_at(data, pos - 1)
            if pos + size != entry_end:
                raise _Uncommon
            if key in wanted:
                if found.get(key):  # overwritten: still checked
                    _feature_values(found[key])
                found[key] = data[pos:entry_end]
            elif size:
                _feature_values(data[pos:entry_end])
            pos = entry_end
    return found


def _feature_values(feature: bytes) -> tuple[int, bytes | list]:
    """A non-empty Feature's list tag and values: strings, ints, or floats as their bytes."""
    tag = feature[0]
    pos, end = _delimited(feature, 0, tag)
    if tag not in (0x0A, 0x12, 0x1A) or end != len(feature):
        raise _Uncommon
    values: list = []
    if tag == 0x0A:  # BytesList: a run of strings
        while pos < end:
            start, pos = _delimited(feature, pos, 0x0A)
            values.append(feature[start:pos])
    elif pos < end:  # FloatList, Int64List: one packed run
        pos, stop = _delimited(feature, pos, 0x0A)
        if stop != end:
            raise _Uncommon
        if tag == 0x12:
            if (end - pos) % 4:
                raise _Uncommon
            return tag, feature[pos:end]
        while pos < end:
            value = feature[pos]
            pos += 1
            if value > 0x7F:
                value, pos = _varint_at(feature, pos - 1)
            values.append(value - (1 << 64) if value >> 63 else value)
    elif tag == 0x12:
        return tag, b""
    if pos != end:
        raise _Uncommon
    return tag, values


def _common_column(entry: tuple, values: list[bytes | None], rows: int) -> np.ndarray:
    """One feature's values from each example's serialized Feature (None, or empty: missing)."""
    _, dtype, size, header, default = entry
    if default is None and not all(values):
        raise _Uncommon  # a required feature missing: protobuf's reader words the error
    if dtype == "float32":  # every example's Feature is the header and 4 * size bytes
        width = len(header) + 4 * size
        features: list = values if default is None else [value or default for value in values]
        if set(map(len, features)) != {width}:
            raise _Uncommon
        table = np.frombuffer(b"".join(features), np.uint8).reshape(rows, width)
        if not (table[:, : len(header)] == np.frombuffer(header, np.uint8)).all():
            raise _Uncommon
        return np.ascontiguousarray(table[:, len(header) :]).view("<f4").astype(np.float32, copy=False)
    tag, flat = _LIST_TAGS[dtype], []
    one_string = size == 1 and tag == 0x0A
    for value in values:
        if not value:
            flat.extend(default)
            continue
        if one_string:  # most string features: a BytesList of one string under 126 bytes, 0x0A n+2 0x0A n
            length = len(value)
            if 3 < length < 0x82 and value[0] == value[2] == 0x0A and value[1] == length - 2 and value[3] == length - 4:
                flat.append(value[4:])
                continue
        kind, got = _feature_values(value)
        if kind != tag or len(got) != size:
            raise _Uncommon
        flat.extend(got)
    return np.array(flat, dtype=object if dtype == "string" else np.int64)
