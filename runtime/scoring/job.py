"""Scoring one object (score_object), with its resume, and many at once (score_many).

Idempotency and resume: each part and the manifest is written whole and atomically, so no reader
sees part of one. TAG hashes the source's identity (S3: ETag and version id; local: mtime and size),
the model, its version, the signature, part_rows and the lines' form, so a rerun keeps the parts an
interruption left and a changed source never mixes with the old one's results; a manifest that
matches makes the rerun a no-op (ScoreResult.skipped). The identity is looked up once more before
the manifest is written, so results of a source replaced meanwhile are never published
(ObjectChanged: the new version's own event scores it). Results are never scored themselves, so an
output prefix in the triggering bucket cannot start a loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import orjson

from runtime.codecs.tfserving import DEFAULT_SIGNATURE
from runtime.errors import ConfigError, InvalidInput, KilnError, ResourceExhausted
from runtime.exchange import Exchange
from runtime.manifest import Signature
from runtime.scoring.formats import Chunk, Counting, Rows, error_line, open_rows, prediction_lines
from runtime.scoring.pipeline import Part, Pipeline
from runtime.scoring.sources import RESULTS_SUFFIX, Source, format_of, is_result, locate
from runtime.storage import KeyNotFound, ObjectChanged, ObjectInfo, Storage, key_parts, open_storage

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "kiln-score/1"
LINES = "strict-json"  # the result lines' form, in the parts' tag: parts of another (bare NaN) are not resumed
PART = re.compile(r"part-(\d{5})-([0-9a-f]{12})\.jsonl")
DEFAULT_CHUNK_ROWS = 256
DEFAULT_PART_ROWS = 10_000
IN_FLIGHT_CHUNKS = 4  # chunks decoded ahead and running at once: the batcher merges them
BUSY_RETRY_SECONDS = 60.0  # how long a chunk waits for room in a full batching queue
Progress = Callable[[int, int], None]  # (rows, input bytes) done since the last call


@dataclass(frozen=True)
class ScoreResult:
    source: str  # the input object's URL
    output: str  # the results' manifest URL ("" for a source that is itself a result)
    rows: int  # rows scored, good and bad (0 when skipped)
    skipped: bool  # the results already existed for this exact input (or the source is a result)
    errors: int = 0  # rows answered with an error line


async def score_object(
    app,
    source: str,
    output_prefix: str,
    *,
    model: str | None = None,
    signature: str = DEFAULT_SIGNATURE,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    part_rows: int = DEFAULT_PART_ROWS,
    name: str | None = None,
    progress: Progress | None = None,
) -> ScoreResult:
    """Score every row of `source` with the model's signature and write the results under
    output_prefix (see the module's docstring); idempotent and resumable. `name`: where under
    output_prefix the results go (default: BUCKET/KEY, or the absolute local path). `progress`
    is called with the rows and input bytes done as they are."""
    if chunk_rows < 1 or part_rows < 1:
        raise ConfigError(f"chunk_rows and part_rows must be positive, got {chunk_rows} and {part_rows}")
    located = locate(source)
    output = open_storage(output_prefix)
    if is_result(located, output):
        log.info("not scoring %s: it is a result itself", source)
        return ScoreResult(source, "", 0, True)
    kind = format_of(located.key)
    if kind is None:
        raise InvalidInput(
            f"{source}: cannot score this object: expected a name ending in .jsonl, .ndjson or "
            f".csv (optionally followed by .gz)"
        )
    model_name = app.repository.named_or_only(model)
    directory = "/".join(key_parts(f"{name or located.name}{RESULTS_SUFFIX}"))
    with (
        app.exchange("batch", "score", what=f"score {source}") as exchange,
        app.repository.hold(model_name) as handle,
    ):
        spec = handle.engine.signature(signature)
        if not spec.batched:
            raise InvalidInput(
                f"signature '{signature}' of model {model_name} has no batch dimension: it takes one request, not rows"
            )
        job = _Job(
            app, handle, signature, spec, located, kind, output, directory, exchange, chunk_rows, part_rows, progress
        )
        return await job.run()


class _Job:
    """One object's scoring: read and decode chunks in a worker thread, run them (several in
    flight), write each part as its chunks complete, then the manifest. Progress is reported on
    the event loop's thread."""

    def __init__(
        self,
        app,
        handle,
        key: str,
        signature: Signature,
        source: Source,
        kind: tuple[str, bool],
        output: Storage,
        directory: str,
        exchange: Exchange,
        chunk_rows: int,
        part_rows: int,
        progress: Progress | None,
    ):
        self.app, self.handle, self.key, self.signature = app, handle, key, signature
        self.source, self.kind, self.output, self.directory = source, kind, output, directory
        self.exchange, self.part_rows, self.progress = exchange, part_rows, progress or (lambda rows, size: None)
        self.chunk_rows, self.in_flight = self._chunking(chunk_rows)
        self.manifest_key = f"{directory}/{MANIFEST}"
        self.manifest_url = f"{output.url}/{self.manifest_key}"

    def _chunking(self, chunk_rows: int) -> tuple[int, int]:
        """Chunk size and chunks in flight that a batching queue takes without refusing them:
        no chunk over max_batch_size, at most half the queue's room."""
        if self.app.batching is None:
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
            self.read = Counting(stream)
            rows = open_rows(self.read, self.kind, self.source.url, self.signature)
            parts = await self._score(rows, info)
        finally:
            await asyncio.to_thread(stream.close)
        current = await asyncio.to_thread(self.source.storage.stat, self.source.key)
        if current.identity != info.identity:
            raise ObjectChanged(
                f"{self.source.url} was replaced while it was being scored; its results are not "
                f"published (the new version's own event scores it)"
            )
        manifest = {
            "format": MANIFEST_FORMAT,
            "source": self.source.url,
            "identity": info.identity,
            "size": info.size,
            "model": self.handle.name,
            "version": self.handle.version,
            "signature": self.key,
            "part_rows": self.part_rows,
            "rows": sum(p.rows for p in parts),
            "errors": sum(p.errors for p in parts),
            "parts": [{"key": self._part_name(p.index, info), "rows": p.rows, "errors": p.errors} for p in parts],
        }
        await asyncio.to_thread(
            self.output.write_bytes, self.manifest_key, orjson.dumps(manifest, option=orjson.OPT_INDENT_2) + b"\n"
        )
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
        return (
            manifest.get("format") == MANIFEST_FORMAT
            and manifest.get("identity") == info.identity
            and manifest.get("model") == self.handle.name
            and manifest.get("signature") == self.key
        )

    def _tag(self, info: ObjectInfo) -> str:
        what = [info.identity, self.handle.name, str(self.handle.version), self.key, str(self.part_rows), LINES]
        return hashlib.sha256("\0".join(what).encode("utf-8", "surrogatepass")).hexdigest()[:12]

    def _part_name(self, index: int, info: ObjectInfo) -> str:
        return f"part-{index:05d}-{self._tag(info)}.jsonl"

    async def _score(self, rows: Rows, info: ObjectInfo) -> list[Part]:
        written = set(await asyncio.to_thread(self.output.list_keys, self.directory))
        pipeline = Pipeline(self.in_flight, lambda part: self._write_part(part, info))
        parts: list[Part] = []
        try:
            for index in itertools.count():
                part = Part(index)
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

    async def _resume(self, part: Part, name: str, rows: Rows) -> None:
        """Take a part an earlier run wrote for this same input, passing its rows by."""
        part.rows, part.errors = await asyncio.to_thread(self._finished_part, name, part.index)
        skipped = await asyncio.to_thread(rows.skip, part.rows)
        if skipped != part.rows or part.rows > self.part_rows:
            raise InvalidInput(
                f"{self.output.url}/{name} holds {part.rows} rows where its input has {skipped}; "
                f"delete {self.output.url}/{self.directory} to score {self.source.url} anew"
            )
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
                raise InvalidInput(
                    f"{self.output.url}/{name}: line {number + 1} is not the result of row "
                    f"{index * self.part_rows + number}; delete {self.directory} to score "
                    f"{self.source.url} anew"
                )
            rows += 1
            errors += "error" in record
        return rows, errors

    async def _write_part(self, part: Part, info: ObjectInfo) -> None:
        data = b"\n".join(part.lines) + b"\n"
        part.lines = []
        await asyncio.to_thread(self.output.write_bytes, f"{self.directory}/{self._part_name(part.index, info)}", data)

    def _remove_stale(self, current: set[str]) -> None:
        """Parts of older inputs in the results' directory (best effort: the manifest is the truth)."""
        try:
            for key in self.output.list_keys(self.directory):
                name = key.rpartition("/")[2]
                if key.count("/") == self.directory.count("/") + 1 and PART.fullmatch(name) and name not in current:
                    self.output.delete(key)
        except KilnError as e:
            log.warning("could not remove old parts under %s/%s: %s", self.output.url, self.directory, e)

    async def _run_chunk(self, chunk: Chunk) -> tuple[list[bytes], int]:
        """The chunk's result lines, in row order, and how many are errors."""
        results: dict[int, bytes] = {
            offset: error_line(chunk, offset, message) for offset, message in chunk.errors.items()
        }
        for offsets, inputs in chunk.groups:
            for offset, line in zip(offsets, await self._predict(chunk, offsets, inputs)):
                results[offset] = line
        self.progress(chunk.count, chunk.bytes)
        return [results[offset] for offset in range(chunk.count)], len(chunk.errors) + len(chunk.failed)

    async def _predict(self, chunk: Chunk, offsets: list[int], inputs: dict[str, np.ndarray]) -> list[bytes]:
        """Result lines for rows that decoded well; a group the model refuses is rerun row by row,
        so that the error names the rows it belongs to."""
        try:
            outputs = await self._execute(inputs)
        except InvalidInput as e:
            if len(offsets) == 1:
                chunk.failed.add(offsets[0])
                return [error_line(chunk, offsets[0], str(e))]
            lines = await asyncio.gather(
                *(
                    self._predict(chunk, [offset], {name: array[i : i + 1] for name, array in inputs.items()})
                    for i, offset in enumerate(offsets)
                )
            )
            return [line for group in lines for line in group]
        return prediction_lines(outputs, [chunk.first_row + offset for offset in offsets])

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


async def score_many(
    app,
    sources: list[str],
    output_prefix: str,
    *,
    names: dict[str, str] | None = None,
    at_once: int = 2,
    progress: Progress | None = None,
    done: Callable[[str, ScoreResult | KilnError], None] | None = None,
    **options,
) -> list[ScoreResult | KilnError]:
    """score_object for every source, `at_once` objects at a time; an object that fails does not
    stop the others: its error takes its place in the list (and goes to `done` with each result).
    `options`: score_object's keyword arguments."""
    limit = asyncio.Semaphore(max(1, at_once))
    names = names or {}

    async def one(source: str) -> ScoreResult | KilnError:
        async with limit:
            try:
                result: ScoreResult | KilnError = await score_object(
                    app, source, output_prefix, name=names.get(source), progress=progress, **options
                )
            except KilnError as e:
                result = e
            except Exception as e:  # a bug: reported with the source, the other objects go on
                log.exception("internal error scoring %s", source)
                result = KilnError(f"internal error: {type(e).__name__}: {e}")
            if done is not None:
                done(source, result)
            return result

    return list(await asyncio.gather(*(one(source) for source in sources)))
