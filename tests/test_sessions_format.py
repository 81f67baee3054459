"""The stored session formats: a tensor's header and chunks (runtime.sessions.encoding) and a
session's manifest (runtime.sessions.manifest). Every dtype and shape round-trips at every chunk size;
every corruption of a header or its data is caught before anything is used; only plain numeric
dtypes are ever written or read, whatever a header claims."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from runtime.errors import InvalidInput
from runtime.sessions import encoding
from runtime.sessions.encoding import FormatError, decode, encode, pack, unpack
from runtime.sessions.keys import SessionKeys
from runtime.sessions.manifest import SessionManifest, TensorEntry, version_of

DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64", "complex64", "complex128")


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtype, shape and bytes (NaN payloads included)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@settings(max_examples=300, deadline=None)
@given(array=st.sampled_from(DTYPES).flatmap(
           lambda dtype: arrays(dtype, array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6))),
       chunk_bytes=st.integers(1, 64), fingerprint=st.text(max_size=20), name=st.text(min_size=1, max_size=20))
def test_every_dtype_and_shape_round_trips_at_every_chunk_size(array, chunk_bytes, fingerprint, name):
    encoded = encode(name, array, fingerprint, chunk_bytes)
    assert all(len(chunk) <= chunk_bytes for chunk in encoded.chunks)
    assert encoded.data_bytes == array.nbytes
    header, back = decode(encoded.header, [bytes(chunk) for chunk in encoded.chunks])
    assert same(back, array) and not back.flags.writeable
    assert (header.name, header.fingerprint, header.shape) == (name, fingerprint, array.shape)
    [(packed_header, unpacked)] = unpack(pack(name, array, fingerprint))
    assert same(unpacked, array) and packed_header.name == name


def test_big_endian_and_strided_arrays_are_stored_little_endian_and_contiguous():
    big = np.arange(12, dtype=">f8").reshape(3, 4)
    encoded = encode("x", big[:, ::2].T)
    assert b"<f8" in encoded.header
    _, back = decode(encoded.header, encoded.chunks)
    assert back.dtype == np.dtype("float64") and back.tolist() == big[:, ::2].T.tolist()


def test_a_contiguous_little_endian_array_is_not_copied():
    array = np.arange(1000, dtype=np.float32)
    encoded = encode("x", array, chunk_bytes=1024)
    assert len(encoded.chunks) == 4 and np.shares_memory(np.frombuffer(encoded.chunks[0], np.uint8), array)


def test_several_packed_tensors_follow_each_other():
    tensors = {"a": np.arange(5, dtype=np.int32), "b": np.zeros((0, 3)), "c": np.float16(1.5)}
    value = b"".join(pack(name, array, "fp") for name, array in tensors.items())
    back = unpack(value)
    assert [header.name for header, _ in back] == ["a", "b", "c"]
    assert all(same(array, np.asarray(tensors[header.name])) for header, array in back)
    with pytest.raises(FormatError, match="needs"):
        unpack(value[:-1])
    with pytest.raises(FormatError):
        unpack(b"")


@pytest.mark.parametrize("value", [np.array(["text"]), np.array([b"bytes"]), np.array([object()]),
                                   np.array(["2024-01-01"], dtype="datetime64[D]"), np.zeros(2, dtype="V4"),
                                   np.zeros(2, dtype=[("a", "<i4")]), np.zeros(2, dtype=np.longdouble)],
                         ids=["str", "bytes", "object", "datetime", "void", "structured", "longdouble"])
def test_only_plain_numeric_dtypes_are_written(value):
    with pytest.raises(InvalidInput, match="can be stored"):
        encode("x", value)


def test_every_flipped_byte_of_header_or_data_is_caught():
    encoded = encode("state", np.arange(6, dtype=np.int16).reshape(2, 3), "model/1/abc", chunk_bytes=5)
    header, chunks = encoded.header, [bytes(chunk) for chunk in encoded.chunks]
    for position in range(len(header)):
        for bit in (0x01, 0x80):
            broken = bytearray(header)
            broken[position] ^= bit
            with pytest.raises(FormatError):
                decode(bytes(broken), chunks)
    for index, chunk in enumerate(chunks):
        for position in range(len(chunk)):
            broken = bytearray(chunk)
            broken[position] ^= 0x04
            with pytest.raises(FormatError, match="checksum"):
                decode(header, [*chunks[:index], bytes(broken), *chunks[index + 1:]])


def test_missing_extra_truncated_and_reordered_chunks_are_caught():
    encoded = encode("state", np.arange(100, dtype=np.float32), chunk_bytes=128)
    header, chunks = encoded.header, [bytes(chunk) for chunk in encoded.chunks]
    for wrong, message in [(chunks[:-1], "data chunks"), (chunks + [b""], "data chunks"),
                           (chunks[:-1] + [chunks[-1][:-1]], "data bytes"), (chunks[::-1], "checksum")]:
        with pytest.raises(FormatError, match=message):
            decode(header, wrong)
    with pytest.raises(FormatError, match="at least"):
        decode(header[:20], chunks)
    with pytest.raises(FormatError, match="header"):
        decode(header + b"x", chunks)


def forge(dtype: str, shape: tuple[int, ...], data: bytes, *, version: int = 1, chunks: int | None = None) -> bytes:
    """A header written by hand, with a correct checksum: what a careless or hostile writer could store."""
    dtype_bytes, name = dtype.encode(), b"x"
    variable = dtype_bytes + name + struct.pack(f"<{len(shape)}Q", *shape)
    fixed = encoding._FIXED.pack(encoding.MAGIC, version, encoding._FIXED.size + len(variable), len(data),
                                 (1 if data else 0) if chunks is None else chunks, len(shape), len(dtype_bytes),
                                 0, len(name), 0)
    return fixed[:-4] + struct.pack("<I", encoding._checksum(fixed, variable, [data])) + variable


@pytest.mark.parametrize("dtype", ["|O8", "<U1", "|S4", "<M8[D]", "|V4", ">f8", "<f16", "f4", "<f4,<i4"])
def test_a_header_naming_any_other_dtype_is_refused_even_with_a_good_checksum(dtype):
    with pytest.raises(FormatError, match="only plain numeric dtypes"):
        decode(forge(dtype, (1,), b"\0" * 8), [b"\0" * 8])


def test_a_forged_header_is_checked_field_by_field():
    assert decode(forge("<f4", (2,), b"\0" * 8), [b"\0" * 8])[1].tolist() == [0.0, 0.0]
    for header, message in [(forge("<f4", (3,), b"\0" * 8), "needs 12 bytes"),
                            (forge("<f4", (2,), b"\0" * 8, version=2), "format 2"),
                            (forge("<f4", (2,), b"\0" * 8, chunks=9), "claims 9 chunks"),
                            (forge("<f4", (1,) * 33, b"\0" * 4), "dimensions"),
                            (pickle.dumps(np.zeros(2, np.float32)), "not a stored tensor")]:
        with pytest.raises(FormatError, match=message):
            decode(header, [b"\0" * 8])


def test_the_manifest_round_trips_and_names_its_chunks():
    manifest = SessionManifest(version=7, write_id="0123456789abcdef", fingerprint="m/1/ab", ttl_ms=1000, history_ttl_ms=2000,
                        history=True, tensors=(TensorEntry(name="k", chunks=2), TensorEntry(name="v", chunks=0)))
    value = manifest.value()
    assert value.startswith(b"7\n") and version_of(value) == 7
    assert SessionManifest.from_value(value) == manifest
    keys = SessionKeys("acme", "s1")
    assert manifest.chunk_keys(keys) == [[f"kiln:{{acme:s1}}:chunk:0123456789abcdef:0:{part}" for part in range(3)],
                                         ["kiln:{acme:s1}:chunk:0123456789abcdef:1:0"]]


@pytest.mark.parametrize("value, message", [
    (b"3\nnot json", "unreadable"),
    (b'3\n{"version": 4, "write_id": "0123456789abcdef", "fingerprint": "", "ttl_ms": 1, "history_ttl_ms": 1, '
     b'"history": false, "tensors": []}', "version 4 inside, 3 in front"),
    (b'1\n{"version": 1, "write_id": "0123456789abcdef", "fingerprint": "", "ttl_ms": 1, "history_ttl_ms": 1, '
     b'"history": false, "tensors": [{"name": "a", "chunks": 1}, {"name": "a", "chunks": 1}]}', "twice"),
    (b'1\n{"version": 1, "write_id": "../../etc", "fingerprint": "", "ttl_ms": 1, "history_ttl_ms": 1, '
     b'"history": false, "tensors": []}', "unreadable"),
    (b"no version at all", "unreadable"),
])
def test_an_unreadable_manifest_is_a_format_error(value, message):
    with pytest.raises(FormatError, match=message):
        SessionManifest.from_value(value)


def test_the_version_is_read_as_the_compare_and_set_script_reads_it():
    assert [version_of(v) for v in (None, b"", b"12\n{}", b"12", b"x12\n", b"0\n")] == [0, 0, 12, 0, 0, 0]
