"""Reading rows and writing result lines; README's "Batch scoring" has the formats.

Speed: rows are read and decoded in chunks (chunk_rows) in a worker thread while earlier chunks run
(scoring.job.IN_FLIGHT_CHUNKS at once), so decoding overlaps the model. Rows of one numeric input of
a fixed shape written as nested JSON lists (images) take a fast path: their brackets are checked to
nest exactly as the shape does, and their numbers parsed as one flat list (the nested lists cost
several times more); any other row, and a chunk with a bad number, goes through the TF Serving codec.

Failures: a row that cannot be scored becomes its error line, so that one bad row never blocks the
others; what no row can get past (an unsupported name, a missing or unreadable object, a corrupt
gzip stream, a CSV header that fits no input) fails the object, so that its event is retried or reported.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO, cast

import numpy as np
import orjson

from runtime.codecs.tfserving import (
    NUMBER_BYTES,
    _jsonable,
    decode_predict,
    fixed_size,
    loads,
    predict_values,
    row_shape,
    skeleton,
)
from runtime.engines.base import check_inputs
from runtime.errors import InvalidInput
from runtime.manifest import Signature, TensorSpec

FAST_PARSE_ROWS = 32  # rows parsed per call on the fast path (see JsonLines._fast)
MAX_LINE_BYTES = 64 << 20  # a longer JSON line is an error row, skipped without reading it whole


def prediction_lines(outputs: dict[str, np.ndarray], rows: list[int]) -> list[bytes]:
    """{"row": N, "predictions": ...} per row, as TF Serving's row format writes each row's value; a
    row holding NaN or Infinity has them as strings (strict JSON), its other numbers as every row does."""
    values = {name: _jsonable(name, array) for name, array in outputs.items()}
    finite = np.ones(len(rows), dtype=bool)
    for array in outputs.values():
        if array.dtype.kind == "f":
            finite &= np.isfinite(array).reshape(len(rows), -1).all(axis=1)
    only = next(iter(values.values())) if len(values) == 1 else None
    lines = []
    for i, (row, finite_row) in enumerate(zip(rows, finite)):
        if finite_row:
            prediction = only[i] if only is not None else {name: value[i] for name, value in values.items()}
        else:
            prediction = predict_values({name: array[i : i + 1] for name, array in outputs.items()}, True, strict=True)[
                "predictions"
            ][0]
        lines.append(orjson.dumps({"row": row, "predictions": prediction}, option=orjson.OPT_SERIALIZE_NUMPY))
    return lines


def error_line(chunk: Chunk, offset: int, message: str) -> bytes:
    line = chunk.lines[offset]
    return orjson.dumps(
        {"row": chunk.first_row + offset, "line": line, "error": f"{chunk.source}, line {line}: {message}"}
    )


@dataclass
class Chunk:
    """Consecutive rows of an input, decoded: groups of rows (offsets in the chunk) with their
    stacked inputs, and the rows that could not be decoded, with why."""

    source: str
    lines: list[int]  # by offset: the line the row starts on
    groups: list[tuple[list[int], dict[str, np.ndarray]]] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)
    failed: set[int] = field(default_factory=set)  # rows that decoded but the model refused
    first_row: int = 0
    bytes: int = 0  # input bytes read for it

    @property
    def count(self) -> int:
        return len(self.lines)


class Counting(io.RawIOBase):
    """A stream that counts the bytes read from it."""

    def __init__(self, stream: BinaryIO):
        self.stream, self.count, self.reported = stream, 0, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.stream.read(len(buffer))
        buffer[: len(data)] = data
        self.count += len(data)
        return len(data)

    def unreported(self) -> int:
        """The bytes read since the last call."""
        count, self.reported = self.count - self.reported, self.count
        return count


def open_rows(stream: io.RawIOBase, kind: tuple[str, bool], source: str, signature: Signature) -> Rows:
    form, compressed = kind
    binary: BinaryIO = io.BufferedReader(stream, 1 << 20)
    if compressed:
        binary = cast(BinaryIO, gzip.GzipFile(fileobj=binary, mode="rb"))
    if form == "jsonl":
        return JsonLines(binary, source, signature)
    return CsvRows(binary, source, signature)


class Rows:
    """Rows read in order from an input; take() decodes the next ones, skip() passes them by."""

    def __init__(self, source: str, signature: Signature):
        self.source, self.signature = source, signature
        self.line = 0

    def take(self, count: int) -> Chunk:
        records = self._guarded(self._records, count)
        chunk = Chunk(self.source, [line for line, _ in records])
        rest = self._fast(chunk, [record for _, record in records])
        self._decode(chunk, [(offset, self._parse(record)) for offset, record in rest])
        return chunk

    def _fast(self, chunk: Chunk, records: list) -> list[tuple[int, object]]:
        """Decode what a fast path can into chunk.groups; the (offset, record)s left for _decode."""
        return list(enumerate(records))

    def _parse(self, record):
        return record

    def skip(self, count: int) -> int:
        return len(self._guarded(self._records, count))

    def _guarded(self, read: Callable[[int], list], count: int) -> list:
        try:
            return read(count)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise InvalidInput(
                f"{self.source}: the gzip stream is corrupt or truncated after line {self.line}: {e}"
            ) from None

    def _records(self, count: int) -> list[tuple[int, object]]:
        raise NotImplementedError

    def _decode(self, chunk: Chunk, values: list[tuple[int, object]]) -> None:
        """Decode rows (offset, parsed record), all at once where they fit together, else one by one."""
        good = [(offset, value) for offset, value in values if not isinstance(value, _Bad)]
        chunk.errors.update((offset, value.message) for offset, value in values if isinstance(value, _Bad))
        if not good:
            return
        try:
            chunk.groups.append(([offset for offset, _ in good], self._arrays([value for _, value in good])))
            return
        except InvalidInput:
            pass
        by_shape: dict[tuple, tuple[list[int], list[dict[str, np.ndarray]]]] = {}
        for offset, value in good:
            try:
                arrays = self._arrays([value])
            except InvalidInput as e:
                chunk.errors[offset] = str(e)
                continue
            shapes = tuple(array.shape for array in arrays.values())
            offsets, rows = by_shape.setdefault(shapes, ([], []))
            offsets.append(offset)
            rows.append(arrays)
        for offsets, rows in by_shape.values():
            chunk.groups.append((offsets, {name: np.concatenate([row[name] for row in rows]) for name in rows[0]}))

    def _arrays(self, values: list) -> dict[str, np.ndarray]:
        """The rows' inputs, stacked and checked against the signature (InvalidInput otherwise)."""
        raise NotImplementedError


@dataclass(frozen=True)
class _Bad:
    """A row that could not even be parsed."""

    message: str


class JsonLines(Rows):
    def __init__(self, stream: BinaryIO, source: str, signature: Signature):
        super().__init__(source, signature)
        self.stream = stream
        spec = signature.inputs[0] if len(signature.inputs) == 1 else None
        self.flat: TensorSpec | None = None
        self.skeleton = b""
        # Floats only: integer inputs take the general path, which refuses fractions (np.array would cut them).
        if spec is not None and spec.dtype.startswith("float") and fixed_size(spec.shape) is not None:
            self.flat, self.skeleton = spec, skeleton(row_shape(spec))

    def _records(self, count: int) -> list[tuple[int, object]]:
        records: list[tuple[int, object]] = []
        while len(records) < count:
            raw = self.stream.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            self.line += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):  # never held whole in memory
                while (rest := self.stream.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass
                records.append((self.line, _Bad(f"the line is longer than {MAX_LINE_BYTES:,} bytes")))
            elif raw.strip():
                records.append((self.line, raw))
        return records

    def _fast(self, chunk: Chunk, records: list) -> list[tuple[int, object]]:
        """Rows of one numeric input of a fixed shape, written as nested lists of numbers: their
        brackets are checked to nest as the shape does, then every number of the chunk is parsed
        in one flat JSON list (parsing the nested lists costs several times more)."""
        if self.flat is None:
            return super()._fast(chunk, records)
        offsets, rest = [], []
        for offset, record in enumerate(records):
            if isinstance(record, bytes) and record.translate(None, NUMBER_BYTES) == self.skeleton:
                offsets.append(offset)
            else:
                rest.append((offset, record))
        if not offsets:
            return rest
        spec = self.flat
        size = math.prod(row_shape(spec))
        array = np.empty((len(offsets), size), dtype=spec.dtype)
        # A few rows per parse, letting go of the interpreter lock after each: the threads that run the
        # model need it to hand back a batch's results and to start the next one, and would otherwise
        # wait for the interpreter's forced switch (every 5 ms) while this thread decodes.
        for start in range(0, len(offsets), FAST_PARSE_ROWS):
            some = offsets[start : start + FAST_PARSE_ROWS]
            try:
                numbers = orjson.loads(b"[%b]" % b",".join(records[offset].translate(None, b"[]") for offset in some))
                if len(numbers) != len(some) * size:
                    return list(enumerate(records))
                array[start : start + len(some)] = np.array(numbers, dtype=spec.dtype).reshape(len(some), size)
            except (orjson.JSONDecodeError, ValueError, TypeError, OverflowError):  # a bad number: row by row
                return list(enumerate(records))
            time.sleep(0)  # lets a waiting thread take the lock now, not at the next forced switch (5 ms)
        chunk.groups.append((offsets, {spec.name: array.reshape((len(offsets), *row_shape(spec)))}))
        return rest

    def _parse(self, record: bytes | _Bad):
        if isinstance(record, _Bad):
            return record
        try:
            return orjson.loads(record)
        except orjson.JSONDecodeError:
            pass
        try:
            return loads(record)  # bare NaN and Infinity; a clear message otherwise
        except InvalidInput as e:
            return _Bad(str(e))

    def _arrays(self, values: list) -> dict[str, np.ndarray]:
        return _instances(values, self.signature)


def _instances(values: list, signature: Signature) -> dict[str, np.ndarray]:
    """TF Serving row-format instances as the signature's inputs, checked (InvalidInput otherwise)."""
    inputs = decode_predict("", {"instances": values}, signature).inputs
    arrays, _ = check_inputs(signature, inputs)
    return arrays


class CsvRows(Rows):
    def __init__(self, stream: BinaryIO, source: str, signature: Signature):
        super().__init__(source, signature)
        self.text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
        self.reader = csv.reader(self.text, strict=True)
        self.columns: list[str] = []
        self.flat: TensorSpec | None = None
        header = self._guarded(self._records, 1)
        if header:
            line, columns = header[0]
            if isinstance(columns, _Bad):
                raise InvalidInput(f"{source}: the header (line {line}) cannot be read: {columns.message}")
            self.columns = columns
            self._check_header()

    def _check_header(self) -> None:
        names = [spec.name for spec in self.signature.inputs]
        if sorted(self.columns) == sorted(names):
            return
        spec = self.signature.inputs[0] if len(self.signature.inputs) == 1 else None
        size = fixed_size(spec.shape) if spec is not None and spec.dtype != "string" else None
        if size is not None and len(self.columns) == size:
            self.flat = spec
            return
        expected = f"columns named by the inputs ({', '.join(names)})"
        if spec is not None and size is not None:
            expected += (
                f", or {size} columns: the values of input '{spec.name}' of shape "
                f"{list(row_shape(spec))} in row-major order"
            )
        raise InvalidInput(
            f"{self.source}: the CSV header (line 1) has {len(self.columns)} columns "
            f"({_abbreviate(self.columns)}); expected {expected}"
        )

    def _records(self, count: int) -> list[tuple[int, object]]:
        records: list[tuple[int, object]] = []
        while len(records) < count:
            start = self.reader.line_num + 1
            try:
                fields = next(self.reader)
            except StopIteration:
                break
            except csv.Error as e:
                self.line = self.reader.line_num
                records.append((start, _Bad(f"the CSV record ({_lines(start, self.line)}) does not parse: {e}")))
                continue
            self.line = self.reader.line_num
            if not fields:
                continue
            if not all(cell.isascii() or _utf8(cell) for cell in fields):
                records.append((start, _Bad("the record is not valid UTF-8 text")))
            elif self.columns and len(fields) != len(self.columns):
                records.append(
                    (start, _Bad(f"the record has {len(fields)} fields; the header has {len(self.columns)}"))
                )
            else:
                records.append((start, fields))
        return records

    def _arrays(self, values: list) -> dict[str, np.ndarray]:
        if self.flat is not None:
            spec = self.flat
            try:
                flat = np.array(values, dtype=np.str_)
                array = _cells(flat, spec).reshape((len(values), *row_shape(spec)))
            except (ValueError, TypeError) as e:
                raise InvalidInput(f"the cells must be {spec.dtype} values of input '{spec.name}': {e}") from None
            arrays, _ = check_inputs(self.signature, {spec.name: array})
            return arrays
        return _instances(
            [
                {column: _cell_value(cell, self.signature.input(column)) for column, cell in zip(self.columns, row)}
                for row in values
            ],
            self.signature,
        )


def _utf8(text: str) -> bool:
    try:
        text.encode()
        return True
    except UnicodeEncodeError:
        return False


def _lines(first: int, last: int) -> str:
    return f"line {first}" if first >= last else f"lines {first}-{last}"


def _abbreviate(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... {len(names) - limit} more" if len(names) > limit else "")


def _cells(cells: np.ndarray, spec: TensorSpec) -> np.ndarray:
    if spec.dtype == "bool":
        lowered = np.char.lower(np.char.strip(cells))
        if not np.isin(lowered, ("true", "false", "1", "0")).all():
            raise ValueError("bools must be true, false, 1 or 0")
        return np.isin(lowered, ("true", "1"))
    return np.char.strip(cells).astype(spec.dtype)


def _cell_value(cell: str, spec: TensorSpec | None):
    """A CSV cell as the JSON value it stands for, for the input named by its column."""
    if spec is None or spec.dtype == "string" and spec.shape is not None and len(spec.shape) == 1:
        return cell
    if spec.shape is not None and len(spec.shape) == 1:  # one value per row
        try:
            return _cells(np.array([cell], dtype=np.str_), spec)[0]
        except (ValueError, TypeError):
            raise InvalidInput(f"column '{spec.name}': cannot read {cell!r} as {spec.dtype}") from None
    try:
        return orjson.loads(cell)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(
            f"column '{spec.name}' must hold the row's value as JSON (its shape is "
            f"{'any' if spec.shape is None else list(spec.shape[1:])}): {e}"
        ) from None
