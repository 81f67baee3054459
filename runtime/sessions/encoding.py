"""The stored form of one tensor: a small validated header, then its raw little-endian bytes.

    header (36 bytes, then the variable part), every integer little-endian:
        magic          8 bytes   b"KILNSTAT"
        format         u16       FORMAT_VERSION
        header bytes   u32       the whole header, variable part included
        data bytes     u64       the raw bytes that follow: shape product times item size
        chunks         u32       how many values the data is split into (0 for no data)
        ndim           u8        at most MAX_NDIM
        dtype bytes    u8        then: the dtype as numpy writes it ("<f4", "|b1", ...)
        fingerprint    u16       then: the servable fingerprint, UTF-8 (empty for token histories)
        name bytes     u16       then: the tensor's name, UTF-8
        checksum       u32       CRC-32 of every other header byte and of the data, in order
        variable part: dtype, fingerprint, name, then ndim u64 dimensions

A tensor is stored either chunked (encode: the header as one value, the data as values of at most
`chunk_bytes` each, so a large K/V cache never becomes one huge value) or inline (pack: header and
data in one value; several may follow each other, as in a prediction cache entry). Reading checks
everything before a byte is used: magic, format, lengths, chunk count, an allowed numeric dtype,
shape against length, and the checksum; any mismatch is a FormatError naming it. Only plain numeric
dtypes are written and read, so nothing stored is ever interpreted as code (no pickle, no objects).

CRC-32 (zlib's, several GB/s, releasing the interpreter lock on large buffers) detects accidental
corruption: truncation, bit flips, parts of another write. It is not a defence against someone who
can write to the store; keys per tenant and session ids bound to tenants (runtime.sessions.ids) are.
"""

from __future__ import annotations

import re
import struct
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from runtime.errors import InvalidInput

MAGIC = b"KILNSTAT"
FORMAT_VERSION = 1
MAX_NDIM = 32
MAX_TEXT_BYTES = 1024
_FIXED = struct.Struct("<8sHIQIBBHHI")
_CHECKED = _FIXED.size - 4  # every fixed byte but the checksum itself
# Plain numeric dtypes only, little-endian or byte-order free: bool, (unsigned) integers, floats, complex.
_DTYPE = re.compile(r"[<|](b1|i1|u1|[iuf][248]|c8|c16)")

Buffer = bytes | bytearray | memoryview


class FormatError(ValueError):
    """Stored bytes that are not a valid tensor, or not the one expected; the message says how."""


@dataclass(frozen=True)
class Header:
    name: str
    fingerprint: str
    dtype: np.dtype
    shape: tuple[int, ...]
    data_bytes: int
    chunks: int
    size: int  # of the header itself


@dataclass(frozen=True)
class Encoded:
    """A tensor ready to store: its header value and its data values (views of the array's memory)."""

    header: bytes
    chunks: list[memoryview]

    @property
    def data_bytes(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)


def encode(name: str, array: np.ndarray, fingerprint: str = "", chunk_bytes: int = 4 << 20) -> Encoded:
    """The header and data chunks of `array`, stored as little-endian raw bytes (no copy when the
    array already is contiguous little-endian). Raises InvalidInput for what cannot be stored."""
    if chunk_bytes < 1:
        raise InvalidInput(f"the chunk size must be positive, got {chunk_bytes}")
    array = _little_endian(name, array)
    raw = memoryview(array.reshape(-1).view(np.uint8).data)
    chunks = [raw[start : start + chunk_bytes] for start in range(0, len(raw), chunk_bytes)]
    dtype, fingerprint_bytes, name_bytes = (
        _text(array.dtype.str, "dtype"),
        _text(fingerprint, "fingerprint"),
        _text(name, "tensor name"),
    )
    variable = dtype + fingerprint_bytes + name_bytes + struct.pack(f"<{array.ndim}Q", *array.shape)
    fixed = _FIXED.pack(
        MAGIC,
        FORMAT_VERSION,
        _FIXED.size + len(variable),
        len(raw),
        len(chunks),
        array.ndim,
        len(dtype),
        len(fingerprint_bytes),
        len(name_bytes),
        0,
    )
    checksum = _checksum(fixed, variable, chunks)
    return Encoded(fixed[:_CHECKED] + struct.pack("<I", checksum) + variable, chunks)


def decode(header: Buffer, chunks: Sequence[Buffer]) -> tuple[Header, np.ndarray]:
    """The header and a read-only array (native byte order) from a header value and its data
    values, after every check; raises FormatError. Copy the array to change it."""
    parsed, checksum = _parse_header(header)
    if len(header) != parsed.size:
        raise FormatError(f"the header of {parsed.name!r} is {len(header)} bytes, it says {parsed.size}")
    if len(chunks) != parsed.chunks:
        raise FormatError(f"{parsed.name!r} has {len(chunks)} data chunks, its header says {parsed.chunks}")
    received = sum(len(chunk) for chunk in chunks)
    if received != parsed.data_bytes:
        raise FormatError(f"{parsed.name!r} has {received} data bytes, its header says {parsed.data_bytes}")
    header = memoryview(header)
    if _checksum(header[:_CHECKED], header[_FIXED.size :], chunks) != checksum:
        raise FormatError(f"the checksum of {parsed.name!r} does not match its bytes: the stored value is corrupt")
    # One chunk is used in place (no copy: fresh memory is what a large load spends most on); several
    # are joined. Either way the array is read-only, so nobody changes what another holds.
    data = chunks[0] if len(chunks) == 1 else bytearray().join(chunks)
    array = np.frombuffer(data, dtype=parsed.dtype).reshape(parsed.shape)
    if not parsed.dtype.isnative or not array.flags.aligned:
        array = array.astype(parsed.dtype.newbyteorder("="))
    array.flags.writeable = False
    return parsed, array


def pack(name: str, array: np.ndarray, fingerprint: str = "") -> bytes:
    """`array` as one value: header and data together."""
    encoded = encode(name, array, fingerprint, chunk_bytes=max(np.asarray(array).nbytes, 1))
    return b"".join([encoded.header, *encoded.chunks])


def unpack(value: Buffer) -> list[tuple[Header, np.ndarray]]:
    """Every tensor of a value written by pack() (or several pack() values joined), in order."""
    value, offset = memoryview(value), 0
    tensors: list[tuple[Header, np.ndarray]] = []
    while offset < len(value) or not tensors:
        header, _ = _parse_header(value[offset:])
        end = offset + header.size + header.data_bytes
        if end > len(value):
            raise FormatError(f"{header.name!r} needs {end - offset} bytes, the value has {len(value) - offset} left")
        data = [value[offset + header.size : end]] if header.chunks else []
        tensors.append(decode(value[offset : offset + header.size], data))
        offset = end
    return tensors


def _parse_header(value: Buffer) -> tuple[Header, int]:
    value = memoryview(value)
    if len(value) < _FIXED.size:
        raise FormatError(f"a stored tensor header needs at least {_FIXED.size} bytes, got {len(value)}")
    (magic, version, size, data_bytes, chunks, ndim, dtype_bytes, fingerprint_bytes, name_bytes, checksum) = (
        _FIXED.unpack_from(value)
    )
    if magic != MAGIC:
        raise FormatError(f"not a stored tensor: it starts with {bytes(magic)!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise FormatError(f"stored tensor format {version}, this runtime reads format {FORMAT_VERSION}")
    if ndim > MAX_NDIM:
        raise FormatError(f"a stored tensor claims {ndim} dimensions, at most {MAX_NDIM} are allowed")
    expected = _FIXED.size + dtype_bytes + fingerprint_bytes + name_bytes + 8 * ndim
    if size != expected or size > len(value):
        raise FormatError(
            f"a stored tensor header says it is {size} bytes; its fields need {expected} and {len(value)} are there"
        )
    offset = _FIXED.size
    fields = []
    for length in (dtype_bytes, fingerprint_bytes, name_bytes):
        try:
            fields.append(bytes(value[offset : offset + length]).decode())
        except UnicodeDecodeError:
            raise FormatError("a stored tensor header has text that is not UTF-8") from None
        offset += length
    dtype_text, fingerprint, name = fields
    if not _DTYPE.fullmatch(dtype_text):
        raise FormatError(f"stored tensor {name!r} has dtype {dtype_text!r}; only plain numeric dtypes are read")
    dtype = np.dtype(dtype_text)
    shape = struct.unpack_from(f"<{ndim}Q", value, offset)
    if _product(shape) * dtype.itemsize != data_bytes:
        raise FormatError(
            f"stored tensor {name!r} of shape {list(shape)} and dtype {dtype_text} needs "
            f"{_product(shape) * dtype.itemsize} bytes, its header says {data_bytes}"
        )
    if (chunks == 0) != (data_bytes == 0) or chunks > data_bytes:
        raise FormatError(f"stored tensor {name!r} claims {chunks} chunks for {data_bytes} bytes")
    return Header(name, fingerprint, dtype, shape, data_bytes, chunks, size), checksum


def _little_endian(name: str, array) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.byteorder == ">" or (array.dtype.byteorder == "=" and sys.byteorder == "big"):
        array = array.astype(array.dtype.newbyteorder("<"))
    if not _DTYPE.fullmatch(array.dtype.str):
        raise InvalidInput(
            f"session tensor {name!r} has dtype {array.dtype}; only bool, integers of 8 to 64 "
            f"bits, float16/32/64 and complex64/128 can be stored"
        )
    if array.ndim > MAX_NDIM:
        raise InvalidInput(f"session tensor {name!r} has {array.ndim} dimensions, at most {MAX_NDIM} are allowed")
    return array if array.flags.c_contiguous else array.copy(order="C")  # (ascontiguousarray makes 0-d 1-d)


def _text(value: str, what: str) -> bytes:
    encoded = value.encode()
    if len(encoded) > MAX_TEXT_BYTES:
        raise InvalidInput(f"a session {what} is {len(encoded)} bytes in UTF-8, at most {MAX_TEXT_BYTES} are allowed")
    return encoded


def _checksum(fixed: Buffer, variable: Buffer, chunks: Sequence[Buffer]) -> int:
    checksum = zlib.crc32(variable, zlib.crc32(memoryview(fixed)[:_CHECKED]))
    for chunk in chunks:
        checksum = zlib.crc32(chunk, checksum)
    return checksum


def _product(shape: Sequence[int]) -> int:
    result = 1
    for dim in shape:
        result *= dim
    return result
