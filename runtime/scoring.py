"""Batch scoring: every row of a stored object through a model, the results written beside it.

The Lambda handler calls score_object for S3 object-created events, the Cloud Run handler for Cloud
Storage object-finalize events and, with expand_inputs and shard, in Cloud Run Jobs; `kiln score`
for inputs named on the command line. Model work goes through App.execute, so the micro-batcher
merges the chunks of an object that are in flight together.

Inputs, by the object's name (a further .gz: gzip-compressed, decompressed as it is read):
  .jsonl, .ndjson  one TF Serving row-format instance per line: a value for a signature with one
                   input, or an object keyed by input name ({"b64": ...} for binary strings; bare
                   NaN and Infinity accepted). Blank lines are not rows.
  .csv             UTF-8 (a byte-order mark is ignored), RFC 4180 quoting, a header row, then one
                   row per record; empty records are not rows. The header either
                   - names every input of the signature, each once, in any order: a cell holds its
                     input's value for the row, a number or text for an input of one value per row
                     (shape [-1]), the value as JSON otherwise (such as [0.5, 1.5] for shape [-1, 2]);
                   - or, for a signature of one numeric input with a fixed shape of K values per row
                     (28x28x1 images: K = 784), has K columns of any names: a row's cells are its
                     values in row-major (C) order.
                   Bools are true/false or 1/0.
Rows are numbered from 0 in input order; messages name the line (1-based) the row starts on. A
JSON line over MAX_LINE_BYTES (64 MiB) is an error row, passed by without being held in memory.

Speed. Rows are read and decoded in chunks (chunk_rows) in a worker thread while earlier chunks run
(IN_FLIGHT_CHUNKS at once), so decoding overlaps the model. Rows of one numeric input of a fixed
shape written as nested JSON lists (images) take a fast path: their brackets are checked to nest
exactly as the shape does, and their numbers parsed as one flat list (the nested lists cost
several times more); any other row (and a chunk with a bad number) goes through the TF Serving
codec, all together where the rows fit, else one by one.

Results: JSON Lines, one line per input row in input order, in parts of `part_rows` rows:
  OUTPUT_PREFIX/NAME.predictions/part-00000-TAG.jsonl    rows 0 .. part_rows-1
  OUTPUT_PREFIX/NAME.predictions/part-00001-TAG.jsonl    ...
  OUTPUT_PREFIX/NAME.predictions/manifest.json           written last: the results are complete
NAME is BUCKET/KEY for s3:// and gs:// sources, and the absolute path without its leading '/' for
local ones (callers may give their own). A row's line is {"row": N, "predictions": P}, P as TF
Serving's row-format answer has it for that row (one output: its value; several: an object by
output name; *_bytes outputs as {"b64": ...}; NaN and ±Infinity as the strings "NaN", "Infinity" and
"-Infinity", so that every line is strict JSON, as all results of the Lambda handler are), or
{"row": N, "line": L, "error": "..."} for a row that could not be scored (malformed JSON, a
wrong shape or dtype, a CSV record that does not parse): one bad row never blocks the others, and
ScoreResult.errors and the manifest count them. What fails the object as a whole (an exception,
so that the event is retried or reported) is what no row can get past: an unsupported name, a
missing or unreadable object, a corrupt or truncated gzip stream, a CSV header that fits no
input, an unknown model or signature, a store that cannot be written.

Idempotency and resume. Each part and the manifest is written whole and atomically (an S3 PUT; a
local file renamed into place), so no reader ever sees part of one. TAG is a hash of the source's
identity (S3: its ETag and version id; local: modification time and size), the model, its version,
the signature, part_rows and the lines' form: a rerun after an interruption skips the parts already
written for the same input and model version (an interruption loses at most the parts in progress), and a changed
source never mixes with results of the old one. The manifest records the source's identity, the
model and signature, the rows and errors, and the parts; a rerun for a source whose identity,
model and signature match it does nothing (ScoreResult.skipped), and a changed source is scored
again. After a new manifest, parts of other TAGs in the directory (an older source) are deleted.
Before the manifest is written the source's identity is looked up once more: results of a source
replaced meanwhile are never published (ObjectChanged; the new version's own event scores it).
Objects inside a *.predictions/ directory or under the output prefix are results, never scored
again (skipped), so that an output prefix in the triggering bucket cannot start a loop.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import hashlib
import io
import itertools
import logging
import re
import time
import zlib
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np
import orjson

from runtime.app import Exchange
from runtime.codecs.tfserving import (NUMBER_BYTES, _jsonable, decode_predict, fixed_size, loads, predict_values,
                                      skeleton)
from runtime.engines.base import check_inputs
from runtime.errors import ConfigError, InvalidInput, KilnError, ResourceExhausted, status_of
from runtime.manifest import Signature, TensorSpec
from runtime.storage import KeyNotFound, ObjectChanged, ObjectInfo, Storage, key_parts, open_storage

log = logging.getLogger(__name__)

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
RESULTS_SUFFIX = ".predictions"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "kiln-score/1"
LINES = "strict-json"  # the result lines' form, in the parts' tag: parts of another (bare NaN) are not resumed
PART = re.compile(r"part-(\d{5})-([0-9a-f]{12})\.jsonl")
DEFAULT_CHUNK_ROWS = 256
DEFAULT_PART_ROWS = 10_000
FAST_PARSE_ROWS = 32  # rows parsed per call on the fast path (see _JsonLines._fast)
IN_FLIGHT_CHUNKS = 4  # chunks decoded ahead and running at once: the batcher merges them
MAX_LINE_BYTES = 64 << 20  # a longer JSON line is an error row, skipped without reading it whole
BUSY_RETRY_SECONDS = 60.0  # how long a chunk waits for room in a full batching queue
Progress = Callable[[int, int], None]  # (rows, input bytes) done since the last call


@dataclass(frozen=True)
class ScoreResult:
    source: str  # the input object's URL
    output: str  # the results' manifest URL ("" for a source that is itself a result)
    rows: int  # rows scored, good and bad (0 when skipped)
    skipped: bool  # the results already existed for this exact input (or the source is a result)
    errors: int = 0  # rows answered with an error line


def default_model(app, name: str | None) -> str:
    """The model to score with: `name`, else the only one the app serves."""
    return app.repository.named_or_only(name)


def shard(items: list[str], index: int, count: int) -> list[str]:
    """Task `index` of `count`'s share of items (Cloud Run Jobs: CLOUD_RUN_TASK_INDEX and
    CLOUD_RUN_TASK_COUNT), in the items' order. An item's task depends on the item alone (a hash of
    it), so tasks that listed an input prefix at slightly different moments still agree on every
    item both saw: each is scored by exactly one task."""
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"task index {index} of {count} tasks: expected 0 <= index < count and count >= 1")
    return [item for item in items if _bucket_of(item, count) == index]


def _bucket_of(item: str, count: int) -> int:
    return int.from_bytes(hashlib.sha256(item.encode("utf-8", "surrogatepass")).digest()[:8], "big") % count


def expand_inputs(inputs: list[str]) -> list[str]:
    """Every object the inputs name: a file or object as it is; a directory or prefix (s3://B/P,
    gs://B/P, a local directory) as its .jsonl, .ndjson and .csv objects (optionally .gz) at any
    depth, sorted, leaving out results (*.predictions/). Local paths come back absolute; duplicates
    once, in first-seen order."""
    found: dict[str, None] = {}
    for item in inputs:
        for url in _expand(item):
            found.setdefault(url, None)
    return list(found)


def _expand(item: str) -> list[str]:
    if _is_object_url(item):
        root, key = _split_object_url(item)
        storage = open_storage(root)
        if key and not item.endswith("/"):
            try:
                storage.stat(key)
                return [item]
            except KeyNotFound:
                pass
        keys = [k for k in storage.list_keys(key) if _scorable(k)]
        if not keys:
            raise InvalidInput(f"no .jsonl, .ndjson or .csv objects (optionally .gz) under {item}")
        return [f"{root}/{k}" for k in keys]
    path = _local_path(item)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        keys = [k for k in open_storage(str(path)).list_keys() if _scorable(k)]
        if not keys:
            raise InvalidInput(f"no .jsonl, .ndjson or .csv files (optionally .gz) in {item}")
        return [str(path / k) for k in keys]
    raise InvalidInput(f"{item}: no such file or directory")


def _scorable(key: str) -> bool:
    return _format_of(key) is not None and not _is_result_key(key)


def _format_of(key: str) -> tuple[str, bool] | None:
    """(jsonl | csv, gzipped) by the name's extension; None for any other name."""
    name = key.rpartition("/")[2].lower()
    compressed = name.endswith(".gz")
    suffix = PurePosixPath(name[:-3] if compressed else name).suffix
    return (FORMATS[suffix], compressed) if suffix in FORMATS else None


def _is_result_key(key: str) -> bool:
    return any(part.endswith(RESULTS_SUFFIX) for part in key.split("/")[:-1])


# Where things are ------------------------------------------------------------------------------

def _is_object_url(url: str) -> bool:
    return url.startswith(("s3://", "gs://"))


def _split_object_url(url: str) -> tuple[str, str]:
    """("s3://BUCKET", KEY): split by hand, since keys may hold '?' and '#'."""
    scheme, _, rest = url.partition("://")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise InvalidInput(f"{url}: no bucket named")
    return f"{scheme}://{bucket}", key.strip("/")


def _local_path(url: str) -> Path:
    if url.startswith("file://"):
        from urllib.parse import unquote, urlparse

        url = unquote(urlparse(url).path)
    return Path(url).absolute()


@dataclass(frozen=True)
class _Source:
    url: str  # as given
    canonical: str  # s3://B/K, gs://B/K or file:///PATH: compared with the output prefix
    storage: Storage
    key: str
    name: str  # where its results go under the output prefix, by default


def _locate(url: str) -> _Source:
    try:
        if _is_object_url(url):
            root, key = _split_object_url(url)
            key = "/".join(key_parts(key))
            if not key:
                raise InvalidInput(f"{url} names a bucket, not an object")
            return _Source(url, f"{root}/{key}", open_storage(root), key, f"{root.partition('://')[2]}/{key}")
        path = _local_path(url)
        return _Source(url, path.as_uri(), open_storage(str(path.parent)), path.name, str(path).lstrip("/"))
    except ValueError as e:
        raise InvalidInput(f"{url}: {e}") from None


def _is_result(source: _Source, output: Storage) -> bool:
    inside_output = source.canonical.startswith(output.url.rstrip("/") + "/")
    return inside_output or _is_result_key(source.canonical.partition("://")[2])


# Scoring one object ----------------------------------------------------------------------------

async def score_object(app, source: str, output_prefix: str, *, model: str | None = None,
                       signature: str = "serving_default", chunk_rows: int = DEFAULT_CHUNK_ROWS,
                       part_rows: int = DEFAULT_PART_ROWS, name: str | None = None,
                       progress: Progress | None = None) -> ScoreResult:
    """Score every row of `source` with the model's signature and write the results under
    output_prefix (see the module's docstring); idempotent and resumable. `name`: where under
    output_prefix the results go (default: BUCKET/KEY, or the absolute local path). `progress`
    is called with the rows and input bytes done as they are."""
    if chunk_rows < 1 or part_rows < 1:
        raise ConfigError(f"chunk_rows and part_rows must be positive, got {chunk_rows} and {part_rows}")
    located = _locate(source)
    output = open_storage(output_prefix)
    if _is_result(located, output):
        log.info("not scoring %s: it is a result itself", source)
        return ScoreResult(source, "", 0, True)
    kind = _format_of(located.key)
    if kind is None:
        raise InvalidInput(f"{source}: cannot score this object: expected a name ending in .jsonl, .ndjson or "
                           f".csv (optionally followed by .gz)")
    model_name = default_model(app, model)
    directory = "/".join(key_parts(f"{name or located.name}{RESULTS_SUFFIX}"))
    exchange = Exchange("batch", api="score")
    status = "OK"
    try:
        with app.repository.handle(model_name) as handle:
            spec = handle.engine.signature(signature)
            if not spec.batched:
                raise InvalidInput(f"signature '{signature}' of model {model_name} has no batch dimension: it "
                                   f"takes one request, not rows")
            job = _Job(app, handle, signature, spec, located, kind, output, directory, exchange,
                       chunk_rows, part_rows, progress)
            return await job.run()
    except BaseException as e:
        status = status_of(e)[1] if isinstance(e, Exception) else "CANCELLED"
        raise
    finally:
        app.finished(exchange, status, f"score {source}")


@dataclass
class _Part:
    index: int
    rows: int = 0
    errors: int = 0
    lines: list[bytes] = field(default_factory=list)


class _Job:
    """One object's scoring: read and decode chunks in a worker thread, run them (several in
    flight), write each part as its chunks complete, then the manifest. Progress is reported on
    the event loop's thread."""

    def __init__(self, app, handle, key: str, signature: Signature, source: _Source, kind: tuple[str, bool],
                 output: Storage, directory: str, exchange: Exchange, chunk_rows: int, part_rows: int,
                 progress: Progress | None):
        self.app, self.handle, self.key, self.signature = app, handle, key, signature
        self.source, self.kind, self.output, self.directory = source, kind, output, directory
        self.exchange, self.part_rows, self.progress = exchange, part_rows, progress or (lambda rows, size: None)
        self.chunk_rows, self.in_flight = self._chunking(chunk_rows)
        self.manifest_key = f"{directory}/{MANIFEST}"
        self.manifest_url = f"{output.url}/{self.manifest_key}"

    def _chunking(self, chunk_rows: int) -> tuple[int, int]:
        """Chunk size and chunks in flight that a batching queue takes without refusing them:
        no chunk over max_batch_size, at most half the queue's room."""
        if self.app.batcher is None or self.app.batching is None:
            return chunk_rows, IN_FLIGHT_CHUNKS
        parameters = self.app.batching(self.handle.name)
        if parameters.mode == "off":
            return chunk_rows, IN_FLIGHT_CHUNKS
        chunk_rows = min(chunk_rows, parameters.max_batch_size)
        room = parameters.max_enqueued_batches * parameters.max_batch_size // 2
        return chunk_rows, max(1, min(IN_FLIGHT_CHUNKS, room // chunk_rows))

    async def run(self) -> ScoreResult:
        info, stream = await asyncio.to_thread(self.source.storage.reader, self.source.key)
        try:
            previous = await asyncio.to_thread(self._manifest)
            if previous is not None and self._same_input(previous, info):
                return ScoreResult(self.source.url, self.manifest_url, 0, True)
            self.read = _Counting(stream)
            rows = _open_rows(self.read, self.kind, self.source.url, self.signature)
            parts = await self._score(rows, info)
        finally:
            await asyncio.to_thread(stream.close)
        current = await asyncio.to_thread(self.source.storage.stat, self.source.key)
        if current.identity != info.identity:
            raise ObjectChanged(f"{self.source.url} was replaced while it was being scored; its results are not "
                                f"published (the new version's own event scores it)")
        manifest = {"format": MANIFEST_FORMAT, "source": self.source.url, "identity": info.identity,
                    "size": info.size, "model": self.handle.name, "version": self.handle.version,
                    "signature": self.key, "part_rows": self.part_rows,
                    "rows": sum(p.rows for p in parts), "errors": sum(p.errors for p in parts),
                    "parts": [{"key": self._part_name(p.index, info), "rows": p.rows, "errors": p.errors}
                              for p in parts]}
        await asyncio.to_thread(self.output.write_bytes, self.manifest_key,
                                orjson.dumps(manifest, option=orjson.OPT_INDENT_2) + b"\n")
        await asyncio.to_thread(self._remove_stale, {part["key"] for part in manifest["parts"]})
        return ScoreResult(self.source.url, self.manifest_url, manifest["rows"], False, manifest["errors"])

    def _manifest(self) -> dict | None:
        try:
            data = orjson.loads(self.output.read_bytes(self.manifest_key))
        except KeyNotFound:
            return None
        except orjson.JSONDecodeError:
            log.warning("%s is not valid JSON; scoring %s again", self.manifest_url, self.source.url)
            return None
        return data if isinstance(data, dict) else None

    def _same_input(self, manifest: dict, info: ObjectInfo) -> bool:
        return (manifest.get("format") == MANIFEST_FORMAT and manifest.get("identity") == info.identity
                and manifest.get("model") == self.handle.name and manifest.get("signature") == self.key)

    def _tag(self, info: ObjectInfo) -> str:
        what = [info.identity, self.handle.name, str(self.handle.version), self.key, str(self.part_rows), LINES]
        return hashlib.sha256("\0".join(what).encode("utf-8", "surrogatepass")).hexdigest()[:12]

    def _part_name(self, index: int, info: ObjectInfo) -> str:
        return f"part-{index:05d}-{self._tag(info)}.jsonl"

    async def _score(self, rows: _Rows, info: ObjectInfo) -> list[_Part]:
        written = set(await asyncio.to_thread(self.output.list_keys, self.directory))
        pipeline = _Pipeline(self.in_flight, lambda part: self._write_part(part, info))
        parts: list[_Part] = []
        try:
            for index in itertools.count():
                part = _Part(index)
                name = f"{self.directory}/{self._part_name(index, info)}"
                if name in written:
                    await self._resume(part, name, rows)
                else:
                    while part.rows < self.part_rows:
                        chunk = await asyncio.to_thread(rows.take, min(self.chunk_rows, self.part_rows - part.rows))
                        chunk.bytes = self.read.unreported()  # reported with the chunk's rows, once they are done
                        if chunk.count == 0:
                            self.progress(0, chunk.bytes)
                            break
                        chunk.first_row = index * self.part_rows + part.rows
                        part.rows += chunk.count
                        await pipeline.add(part, self._run_chunk(chunk))
                    if part.rows:
                        pipeline.finish(part)
                if part.rows:
                    parts.append(part)
                if part.rows < self.part_rows:
                    break
            await pipeline.close()
        except BaseException:
            pipeline.cancel()
            raise
        return parts

    async def _resume(self, part: _Part, name: str, rows: _Rows) -> None:
        """Take a part an earlier run wrote for this same input, passing its rows by."""
        part.rows, part.errors = await asyncio.to_thread(self._finished_part, name, part.index)
        skipped = await asyncio.to_thread(rows.skip, part.rows)
        if skipped != part.rows or part.rows > self.part_rows:
            raise InvalidInput(f"{self.output.url}/{name} holds {part.rows} rows where its input has {skipped}; "
                               f"delete {self.output.url}/{self.directory} to score {self.source.url} anew")
        self.progress(part.rows, self.read.unreported())

    def _finished_part(self, name: str, index: int) -> tuple[int, int]:
        """The rows and error lines of a part an earlier run wrote, checked to be that part."""
        rows = errors = 0
        for number, line in enumerate(self.output.read_bytes(name).splitlines()):
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or record.get("row") != index * self.part_rows + number:
                raise InvalidInput(f"{self.output.url}/{name}: line {number + 1} is not the result of row "
                                   f"{index * self.part_rows + number}; delete {self.directory} to score "
                                   f"{self.source.url} anew")
            rows += 1
            errors += "error" in record
        return rows, errors

    async def _write_part(self, part: _Part, info: ObjectInfo) -> None:
        data = b"\n".join(part.lines) + b"\n"
        part.lines = []
        await asyncio.to_thread(self.output.write_bytes,
                                f"{self.directory}/{self._part_name(part.index, info)}", data)

    def _remove_stale(self, current: set[str]) -> None:
        """Parts of older inputs in the results' directory (best effort: the manifest is the truth)."""
        try:
            for key in self.output.list_keys(self.directory):
                name = key.rpartition("/")[2]
                if key.count("/") == self.directory.count("/") + 1 and PART.fullmatch(name) and name not in current:
                    self.output.delete(key)
        except KilnError as e:
            log.warning("could not remove old parts under %s/%s: %s", self.output.url, self.directory, e)

    async def _run_chunk(self, chunk: _Chunk) -> tuple[list[bytes], int]:
        """The chunk's result lines, in row order, and how many are errors."""
        results: dict[int, bytes] = {offset: _error_line(chunk, offset, message)
                                     for offset, message in chunk.errors.items()}
        for offsets, inputs in chunk.groups:
            for offset, line in zip(offsets, await self._predict(chunk, offsets, inputs)):
                results[offset] = line
        self.progress(chunk.count, chunk.bytes)
        return [results[offset] for offset in range(chunk.count)], len(chunk.errors) + len(chunk.failed)

    async def _predict(self, chunk: _Chunk, offsets: list[int], inputs: dict[str, np.ndarray]) -> list[bytes]:
        """Result lines for rows that decoded well; a group the model refuses is rerun row by row,
        so that the error names the rows it belongs to."""
        try:
            outputs = await self._execute(inputs)
        except InvalidInput as e:
            if len(offsets) == 1:
                chunk.failed.add(offsets[0])
                return [_error_line(chunk, offsets[0], str(e))]
            lines = await asyncio.gather(*(
                self._predict(chunk, [offset], {name: array[i:i + 1] for name, array in inputs.items()})
                for i, offset in enumerate(offsets)))
            return [line for group in lines for line in group]
        return _prediction_lines(outputs, [chunk.first_row + offset for offset in offsets])

    async def _execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """App.execute, waiting while a batching queue shared with other traffic is full."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + BUSY_RETRY_SECONDS
        delay = 0.005
        while True:
            try:
                return await self.app.execute(self.handle, self.key, inputs, self.exchange)
            except ResourceExhausted:
                if loop.time() + delay > give_up:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)


class _Pipeline:
    """Chunks in flight, at most `limit`, finished in input order: each chunk's lines join its
    part, and a part is written (one write at a time) once all of its chunks are done."""

    def __init__(self, limit: int, write: Callable[[_Part], Coroutine]):
        self.limit, self.write = limit, write
        self.window: deque[tuple[_Part, asyncio.Task | None]] = deque()  # None: the part is complete
        self.running = 0
        self.writing: asyncio.Task | None = None

    async def add(self, part: _Part, work: Coroutine) -> None:
        self.window.append((part, asyncio.create_task(work)))
        self.running += 1
        await self._drain(self.limit - 1)

    def finish(self, part: _Part) -> None:
        self.window.append((part, None))

    async def close(self) -> None:
        await self._drain(0)
        if self.writing is not None:
            await self.writing

    def cancel(self) -> None:
        for _, task in self.window:
            if task is not None:
                task.cancel()
        if self.writing is not None:
            self.writing.cancel()

    async def _drain(self, keep: int) -> None:
        """Finish chunks until at most `keep` run, and start writing every complete part in front."""
        while self.window and (self.running > keep or self.window[0][1] is None):
            part, task = self.window.popleft()
            if task is None:
                if self.writing is not None:
                    await self.writing
                self.writing = asyncio.create_task(self.write(part))
                continue
            lines, errors = await task
            self.running -= 1
            part.lines.extend(lines)
            part.errors += errors


def _prediction_lines(outputs: dict[str, np.ndarray], rows: list[int]) -> list[bytes]:
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
            prediction = predict_values({name: array[i:i + 1] for name, array in outputs.items()}, True,
                                        strict=True)["predictions"][0]
        lines.append(orjson.dumps({"row": row, "predictions": prediction}, option=orjson.OPT_SERIALIZE_NUMPY))
    return lines


def _error_line(chunk: _Chunk, offset: int, message: str) -> bytes:
    line = chunk.lines[offset]
    return orjson.dumps({"row": chunk.first_row + offset, "line": line,
                         "error": f"{chunk.source}, line {line}: {message}"})


# Reading rows ----------------------------------------------------------------------------------

@dataclass
class _Chunk:
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


class _Counting(io.RawIOBase):
    """A stream that counts the bytes read from it."""

    def __init__(self, stream: BinaryIO):
        self.stream, self.count, self.reported = stream, 0, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.stream.read(len(buffer))
        buffer[:len(data)] = data
        self.count += len(data)
        return len(data)

    def unreported(self) -> int:
        """The bytes read since the last call."""
        count, self.reported = self.count - self.reported, self.count
        return count


def _open_rows(stream: io.RawIOBase, kind: tuple[str, bool], source: str, signature: Signature) -> _Rows:
    form, compressed = kind
    binary: BinaryIO = io.BufferedReader(stream, 1 << 20)
    if compressed:
        binary = gzip.GzipFile(fileobj=binary, mode="rb")
    if form == "jsonl":
        return _JsonLines(binary, source, signature)
    return _CsvRows(binary, source, signature)


class _Rows:
    """Rows read in order from an input; take() decodes the next ones, skip() passes them by."""

    def __init__(self, source: str, signature: Signature):
        self.source, self.signature = source, signature
        self.line = 0

    def take(self, count: int) -> _Chunk:
        records = self._guarded(self._records, count)
        chunk = _Chunk(self.source, [line for line, _ in records])
        rest = self._fast(chunk, [record for _, record in records])
        self._decode(chunk, [(offset, self._parse(record)) for offset, record in rest])
        return chunk

    def _fast(self, chunk: _Chunk, records: list) -> list[tuple[int, object]]:
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
            raise InvalidInput(f"{self.source}: the gzip stream is corrupt or truncated after line {self.line}: "
                               f"{e}") from None

    def _records(self, count: int) -> list[tuple[int, object]]:
        raise NotImplementedError

    def _decode(self, chunk: _Chunk, values: list[tuple[int, object]]) -> None:
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


class _JsonLines(_Rows):
    def __init__(self, stream: BinaryIO, source: str, signature: Signature):
        super().__init__(source, signature)
        self.stream = stream
        spec = signature.inputs[0] if len(signature.inputs) == 1 else None
        # Floats only: integer inputs take the general path, which refuses fractions (np.array would cut them).
        flat = spec is not None and spec.dtype.startswith("float") and fixed_size(spec.shape) is not None
        self.flat, self.skeleton = (spec, skeleton(spec.shape[1:])) if flat else (None, b"")

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

    def _fast(self, chunk: _Chunk, records: list) -> list[tuple[int, object]]:
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
        spec, size = self.flat, fixed_size(self.flat.shape)
        array = np.empty((len(offsets), size), dtype=spec.dtype)
        # A few rows per parse, letting go of the interpreter lock after each: the threads that run the
        # model need it to hand back a batch's results and to start the next one, and would otherwise
        # wait for the interpreter's forced switch (every 5 ms) while this thread decodes.
        for start in range(0, len(offsets), FAST_PARSE_ROWS):
            some = offsets[start:start + FAST_PARSE_ROWS]
            try:
                numbers = orjson.loads(b"[%b]" % b",".join(records[offset].translate(None, b"[]") for offset in some))
                if len(numbers) != len(some) * size:
                    return list(enumerate(records))
                array[start:start + len(some)] = np.array(numbers, dtype=spec.dtype).reshape(len(some), size)
            except (orjson.JSONDecodeError, ValueError, TypeError, OverflowError):  # a bad number: row by row
                return list(enumerate(records))
            time.sleep(0)  # lets a waiting thread take the lock now, not at the next forced switch (5 ms)
        chunk.groups.append((offsets, {spec.name: array.reshape((len(offsets), *spec.shape[1:]))}))
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


class _CsvRows(_Rows):
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
        if size is not None:
            expected += (f", or {size} columns: the values of input '{spec.name}' of shape "
                         f"{list(spec.shape[1:])} in row-major order")
        raise InvalidInput(f"{self.source}: the CSV header (line 1) has {len(self.columns)} columns "
                           f"({_abbreviate(self.columns)}); expected {expected}")

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
                records.append((start, _Bad(f"the record has {len(fields)} fields; the header has "
                                            f"{len(self.columns)}")))
            else:
                records.append((start, fields))
        return records

    def _arrays(self, values: list) -> dict[str, np.ndarray]:
        if self.flat is not None:
            spec = self.flat
            try:
                flat = np.array(values, dtype=np.str_)
                array = _cells(flat, spec).reshape((len(values), *spec.shape[1:]))
            except (ValueError, TypeError) as e:
                raise InvalidInput(f"the cells must be {spec.dtype} values of input '{spec.name}': {e}") from None
            arrays, _ = check_inputs(self.signature, {spec.name: array})
            return arrays
        return _instances([{column: _cell_value(cell, self.signature.input(column))
                            for column, cell in zip(self.columns, row)} for row in values], self.signature)


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
        raise InvalidInput(f"column '{spec.name}' must hold the row's value as JSON (its shape is "
                           f"{'any' if spec.shape is None else list(spec.shape[1:])}): {e}") from None


# Many objects ----------------------------------------------------------------------------------

def plan_inputs(items: list[str], output_prefix: str) -> tuple[list[str], dict[str, str]]:
    """`kiln score`'s inputs: every object the items name (expand_inputs) but results, and where
    the results of local ones go: their paths relative to the directory named (or, for a file
    named, its name), so that `kiln score data/ --out results/` writes results/a.jsonl.predictions/.
    Objects in stores keep the default (BUCKET/KEY), the same as the Lambda and Cloud Run handlers."""
    output = open_storage(output_prefix)
    sources: dict[str, None] = {}
    names: dict[str, str] = {}
    for item in items:
        base = None if _is_object_url(item) else _local_path(item)
        for source in _expand(item):
            if source in sources or _is_result(_locate(source), output):
                continue
            sources[source] = None
            if base is not None:
                path = _local_path(source)
                names[source] = path.relative_to(base).as_posix() if base.is_dir() else path.name
    taken: dict[str, str] = {}
    for source, name in names.items():
        if name in taken:
            raise InvalidInput(f"{taken[name]} and {source} would both write their results to "
                               f"{output.url}/{name}{RESULTS_SUFFIX}/; score them into different outputs")
        taken[name] = source
    return list(sources), names


def input_size(source: str) -> int:
    """The object's size in bytes, for progress."""
    located = _locate(source)
    return located.storage.stat(located.key).size


async def score_many(app, sources: list[str], output_prefix: str, *, names: dict[str, str] | None = None,
                     at_once: int = 2, progress: Progress | None = None,
                     done: Callable[[str, ScoreResult | KilnError], None] | None = None,
                     **options) -> list[ScoreResult | KilnError]:
    """score_object for every source, `at_once` objects at a time; an object that fails does not
    stop the others: its error takes its place in the list (and goes to `done` with each result).
    `options`: score_object's keyword arguments."""
    limit = asyncio.Semaphore(max(1, at_once))
    names = names or {}

    async def one(source: str) -> ScoreResult | KilnError:
        async with limit:
            try:
                result: ScoreResult | KilnError = await score_object(
                    app, source, output_prefix, name=names.get(source), progress=progress, **options)
            except KilnError as e:
                result = e
            except Exception as e:  # a bug: reported with the source, the other objects go on
                log.exception("internal error scoring %s", source)
                result = KilnError(f"internal error: {type(e).__name__}: {e}")
            if done is not None:
                done(source, result)
            return result

    return list(await asyncio.gather(*(one(source) for source in sources)))
