"""The host operations of a string front against TensorFlow's own ops, over generated inputs:
Fingerprint64 hash buckets and tf.Example parsing (values, defaults, and the errors' wording)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.errors import InvalidInput
from runtime.host_program import hash_buckets, load_table, save_table
from runtime.manifest import DenseFeature
from runtime.tf_example import parse_dense, parse_with_protobuf

tf = pytest.importorskip("tensorflow")
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
strings = st.one_of(st.binary(max_size=300), st.text(max_size=40).map(str.encode), st.just(b""))


@SETTINGS
@given(st.lists(strings, min_size=1, max_size=20), st.sampled_from([1, 2, 7, 64, 1000, 2**31 - 1, 2**62]))
def test_hash_buckets_equal_string_to_hash_bucket_fast(values, buckets):
    array = np.array(values, dtype=object)
    ours = hash_buckets(array, buckets)
    theirs = tf.strings.to_hash_bucket_fast(tf.constant(values, tf.string), buckets).numpy()
    assert ours.dtype == np.int64 and ours.tolist() == theirs.tolist()


def test_hash_buckets_keep_the_shape():
    array = np.array([[b"a", b"b"], [b"", "é".encode()]], dtype=object)
    assert hash_buckets(array, 10).shape == (2, 2)


@SETTINGS
@given(st.lists(st.binary(max_size=30), unique=True, max_size=50), st.lists(st.binary(max_size=30), max_size=20))
def test_saved_table_round_trips_any_bytes(tmp_path_factory, keys, probes):
    path = tmp_path_factory.mktemp("table") / "t.npz"
    save_table(path, np.array(keys, dtype=object), np.arange(len(keys), dtype=np.int64))
    table = load_table(path)
    assert table == {key: index for index, key in enumerate(keys)}


FEATURES = (
    DenseFeature(key="x", dtype="float32", shape=(2,)),
    DenseFeature(key="i", dtype="int64", shape=(1,), default=(7,)),
    DenseFeature(key="s", dtype="string", shape=(), default=("ZA==",)),  # b"d"
    DenseFeature(key="m", dtype="float32", shape=(2, 2), default=(0.5, 1.5, -2.0, 3.0)),
)
TF_FEATURES = {
    "x": tf.io.FixedLenFeature([2], tf.float32),
    "i": tf.io.FixedLenFeature([1], tf.int64, default_value=[7]),
    "s": tf.io.FixedLenFeature([], tf.string, default_value="d"),
    "m": tf.io.FixedLenFeature([2, 2], tf.float32, default_value=[[0.5, 1.5], [-2.0, 3.0]]),
}
floats = st.floats(width=32, allow_nan=False)
int64s = st.integers(-2**63, 2**63 - 1)
value_lists = st.one_of(
    st.lists(floats, max_size=5).map(lambda v: tf.train.Feature(float_list=tf.train.FloatList(value=v))),
    st.lists(int64s, max_size=5).map(lambda v: tf.train.Feature(int64_list=tf.train.Int64List(value=v))),
    st.lists(strings, max_size=3).map(lambda v: tf.train.Feature(bytes_list=tf.train.BytesList(value=v))),
    st.just(tf.train.Feature()),  # present, with no value list
)
# Mostly well-formed examples (so that values are compared, not only errors), some of anything.
well_formed = st.fixed_dictionaries(
    {"x": st.lists(floats, min_size=2, max_size=2).map(lambda v: tf.train.Feature(float_list=tf.train.FloatList(value=v)))},
    optional={"i": st.lists(int64s, min_size=1, max_size=1).map(
                  lambda v: tf.train.Feature(int64_list=tf.train.Int64List(value=v))),
              "s": st.lists(strings, min_size=1, max_size=1).map(
                  lambda v: tf.train.Feature(bytes_list=tf.train.BytesList(value=v))),
              "m": st.lists(floats, min_size=4, max_size=4).map(
                  lambda v: tf.train.Feature(float_list=tf.train.FloatList(value=v))),
              "other": value_lists})
anything = st.dictionaries(st.sampled_from(["x", "i", "s", "m", "other"]), value_lists, max_size=5)
examples = st.one_of(well_formed, well_formed, anything).map(
    lambda features: tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString())


def tensorflow_parse(serialized: list[bytes]):
    """TensorFlow's values, or its InvalidArgument message (without the op's suffix)."""
    try:
        parsed = tf.io.parse_example(tf.constant(serialized, tf.string), TF_FEATURES)
    except tf.errors.InvalidArgumentError as e:
        return re.sub(r"^\{\{function_node [^}]*\}\} | \[Op:\w+\]( name: )?$", "", e.message)
    except UnicodeDecodeError:  # TensorFlow's message quotes the bad proto, which Python cannot decode
        return "Could not parse example input"
    return [parsed[f.key].numpy() for f in FEATURES]


@SETTINGS
@given(st.lists(examples, min_size=1, max_size=6))
def test_parse_dense_equals_parse_example(serialized):
    theirs = tensorflow_parse(serialized)
    try:
        ours = parse_dense(np.array(serialized, dtype=object), FEATURES)
    except InvalidInput as e:
        assert str(e) == theirs
        return
    assert not isinstance(theirs, str), f"TensorFlow refused what Kiln parsed: {theirs}"
    for feature, mine, want in zip(FEATURES, ours, theirs):
        assert mine.shape == want.shape
        if feature.dtype == "string":
            assert mine.tolist() == want.tolist()
        else:
            assert mine.dtype == want.dtype and np.array_equal(mine, want)


def test_context_then_example_lets_the_example_win():
    """TF Serving sends a context's bytes before each example's; the example's features win."""
    context = tf.train.Example(features=tf.train.Features(feature={
        "x": tf.train.Feature(float_list=tf.train.FloatList(value=[1.0, 2.0])),
        "i": tf.train.Feature(int64_list=tf.train.Int64List(value=[5]))})).SerializeToString()
    example = tf.train.Example(features=tf.train.Features(feature={
        "x": tf.train.Feature(float_list=tf.train.FloatList(value=[3.0, 4.0]))})).SerializeToString()
    ours = parse_dense(np.array([context + example], dtype=object), FEATURES)
    theirs = tensorflow_parse([context + example])
    assert ours[0].tolist() == theirs[0].tolist() == [[3.0, 4.0]] and ours[1].tolist() == [[5]]


@pytest.mark.parametrize("data", [b"\x0a\x05\x0a\x03", b"\xff\xff\xff", b"\x0a"])
def test_unparsable_example_is_refused_as_tensorflow_does(data):
    theirs = tensorflow_parse([data])
    with pytest.raises(InvalidInput) as error:
        parse_dense(np.array([data], dtype=object), FEATURES)
    assert isinstance(theirs, str) and theirs.startswith("Could not parse example input")
    assert str(error.value).startswith("Could not parse example input")


def outcome(parse, serialized: list[bytes]):
    """A parser's arrays as lists (floats by their bits), or its error message."""
    try:
        arrays = parse(np.array(serialized, dtype=object), FEATURES)
    except InvalidInput as e:
        return str(e)
    return [(a.dtype.str, a.shape, (a.view(np.uint32) if a.dtype == np.float32 else a).tolist()) for a in arrays]


def mutated(example: bytes, how: str, at: int, byte: int) -> bytes:
    """The example with one byte changed, cut short, or a byte put in: encodings the direct reader
    must either read as protobuf does or leave to it."""
    at %= len(example) + 1
    if how == "change" and at < len(example):
        return example[:at] + bytes([byte]) + example[at + 1 :]
    if how == "cut":
        return example[:at]
    if how == "insert":
        return example[:at] + bytes([byte]) + example[at:]
    return example


@SETTINGS
@given(st.lists(st.tuples(examples, st.sampled_from(["change", "cut", "insert", "keep", "keep"]),
                          st.integers(0, 400), st.integers(0, 255)), min_size=1, max_size=6),
       st.booleans())
def test_direct_reader_answers_as_protobufs(cases, with_context):
    """parse_dense reads the common encoding itself and leaves the rest to the protobuf reader:
    values (bit for bit) and errors are the same either way, for any bytes."""
    serialized = [mutated(example, how, at, byte) for example, how, at, byte in cases]
    if with_context:  # TF Serving's context before the example: two Features fields
        serialized = [serialized[-1] + data for data in serialized]
    assert outcome(parse_dense, serialized) == outcome(parse_with_protobuf, serialized)


def test_what_serializers_write_is_read_without_protobuf(monkeypatch):
    """The direct reader takes the common encoding: long strings and keys (lengths of several
    bytes), negative and large ints, defaults, other features of every kind, a context."""
    def refused(*_):
        raise AssertionError("left to the protobuf reader")

    monkeypatch.setattr("runtime.tf_example.parse_with_protobuf", refused)
    other = {"k" * 200: tf.train.Feature(int64_list=tf.train.Int64List(value=[-1, 2**63 - 1, 300])),
             "f": tf.train.Feature(float_list=tf.train.FloatList(value=[0.5] * 70)),
             "b": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"", b"x" * 300])),
             "e": tf.train.Feature()}
    rows = [
        {"x": tf.train.Feature(float_list=tf.train.FloatList(value=[1.5, -2.0])),
         "i": tf.train.Feature(int64_list=tf.train.Int64List(value=[-(2**63)])),
         "s": tf.train.Feature(bytes_list=tf.train.BytesList(value=["é".encode() * 100])), **other},
        {"x": tf.train.Feature(float_list=tf.train.FloatList(value=[3.0, 4.0])),
         "s": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b""]))},
        {"x": tf.train.Feature(float_list=tf.train.FloatList(value=[5.0, 6.0])),
         "m": tf.train.Feature(float_list=tf.train.FloatList(value=[1.0, 2.0, 3.0, 4.0])),
         "i": tf.train.Feature(int64_list=tf.train.Int64List(value=[123456789]))},
    ]
    serialized = [tf.train.Example(features=tf.train.Features(feature=row)).SerializeToString() for row in rows]
    serialized.append(serialized[0] + serialized[1])
    ours = parse_dense(np.array(serialized, dtype=object), FEATURES)
    for feature, mine, want in zip(FEATURES, ours, tensorflow_parse(serialized)):
        assert mine.dtype == want.dtype or feature.dtype == "string"
        assert mine.shape == want.shape and mine.tolist() == want.tolist()
