"""TFRecord framing throughput: reading (both checksums verified) a warm-up file of PredictLog-sized
records with runtime.tfrecord (google-crc32c) against the pure-Python table CRC-32C Kiln used before
(kept here, only as the baseline).

Why: a servable's warm-up file is read and verified on every load, inside its cold start; a large one
took seconds at the old speed. Prints MB/s of each and the ratio (issue 18's target: at least 50x).
The two readers run in alternating rounds on the same file; each figure is the median round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import tempfile
import time
from pathlib import Path

from common import ROOT, write_results

from runtime.tfrecord import read_records, write_records


def _table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _table()


def _python_masked_crc(data: bytes) -> int:
    """The CRC of runtime/warmup.py before issue 18: a byte at a time through a table."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _python_read(path: Path) -> int:
    """The old reader's work: the same framing, verified with the pure-Python CRC."""
    records = 0
    with open(path, "rb") as f:
        while header := f.read(12):
            length, length_crc = struct.unpack("<QI", header)
            assert _python_masked_crc(header[:8]) == length_crc
            data, footer = f.read(length), f.read(4)
            assert _python_masked_crc(data) == struct.unpack("<I", footer)[0]
            records += 1
    return records


def _timed(read, path: Path) -> float:
    started = time.perf_counter()
    read(path)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=8, help="size of the file (default 8)")
    parser.add_argument("--record-bytes", type=int, default=64 << 10, help="bytes per record (default 64 KiB)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "load" / "results")
    args = parser.parse_args()
    count = max(1, int(args.megabytes * (1 << 20)) // args.record_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tf_serving_warmup_requests"
        write_records(path, (os.urandom(args.record_bytes) for _ in range(count)))
        size = path.stat().st_size
        assert _python_read(path) == sum(1 for _ in read_records(path)) == count  # both accept the file
        before, after = [], []
        for _ in range(args.rounds):
            before.append(_timed(_python_read, path))
            after.append(_timed(lambda p: sum(1 for _ in read_records(p)), path))
    mb = size / 1e6
    results = {"file_bytes": size, "records": count, "rounds": args.rounds,
               "pure_python_mb_per_s": round(mb / statistics.median(before), 2),
               "google_crc32c_mb_per_s": round(mb / statistics.median(after), 1),
               "speedup": round(statistics.median(before) / statistics.median(after), 1)}
    write_results("tfrecord_framing", results, args.out)


if __name__ == "__main__":
    main()
