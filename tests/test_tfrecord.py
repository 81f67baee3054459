"""runtime.tfrecord frames records byte for byte as TensorFlow's TFRecordWriter does, reads them back,
and refuses a record whose checksum does not match."""

from __future__ import annotations

import pytest

from runtime.errors import ServableError
from runtime.tfrecord import read_records, write_records

tf = pytest.importorskip("tensorflow")
RECORDS = [b"", b"x", bytes(range(256)) * 40, b"warm-up" * 1000]


def test_frames_equal_tensorflows(tmp_path):
    with tf.io.TFRecordWriter(str(tmp_path / "tf")) as writer:
        for record in RECORDS:
            writer.write(record)
    write_records(tmp_path / "kiln", RECORDS)
    assert (tmp_path / "kiln").read_bytes() == (tmp_path / "tf").read_bytes()
    assert list(read_records(tmp_path / "tf")) == RECORDS


def test_a_flipped_bit_is_refused(tmp_path):
    write_records(tmp_path / "records", RECORDS)
    data = bytearray((tmp_path / "records").read_bytes())
    data[-10] ^= 1  # inside the last record's data
    (tmp_path / "records").write_bytes(bytes(data))
    with pytest.raises(ServableError, match="record 3: the data's checksum does not match"):
        list(read_records(tmp_path / "records"))
