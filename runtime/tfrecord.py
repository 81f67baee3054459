"""TFRecord framing (TF Serving's warm-up file format): each record is a little-endian uint64 length,
the masked CRC-32C of those 8 bytes, the data, and the data's masked CRC-32C. The CRC is
google-crc32c's native one (hardware CRC32 instructions): a large warm-up file is verified in
milliseconds, not seconds (load/tfrecord_framing.py)."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import google_crc32c

from runtime.errors import ServableError

_MASK_DELTA = 0xA282EAD8


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC-32C: rotated right by 15 bits plus a constant, so that a CRC stored
    inside checksummed data does not checksum to itself."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """One record, framed."""
    header = struct.pack("<Q", len(data))
    return b"".join((header, struct.pack("<I", masked_crc(header)), data, struct.pack("<I", masked_crc(data))))


def write_records(path: Path, records: Iterable[bytes]) -> None:
    with open(path, "wb") as f:
        for record in records:
            f.write(frame(record))


def read_records(path: Path) -> Iterator[bytes]:
    """The records of a TFRecord file, both checksums of each verified."""
    with open(path, "rb") as f:
        index = 0
        while header := f.read(12):
            if len(header) < 12:
                raise ServableError(f"{path}: record {index} is truncated in its header")
            length, length_crc = struct.unpack("<QI", header)
            if masked_crc(header[:8]) != length_crc:
                raise ServableError(f"{path}: record {index}: the length's checksum does not match (corrupt file)")
            data, footer = f.read(length), f.read(4)
            if len(data) < length or len(footer) < 4:
                raise ServableError(f"{path}: record {index} is truncated: {length} bytes announced")
            if masked_crc(data) != struct.unpack("<I", footer)[0]:
                raise ServableError(f"{path}: record {index}: the data's checksum does not match (corrupt file)")
            yield data
            index += 1
