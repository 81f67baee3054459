"""What every batch engine's adapter shares: a servable opened once per process, rows made inputs,
and scoring in which one bad row never fails its batch.

A servable is named by its directory, BASE/NAME/VERSION, as a local path or a store URL (file://,
s3://, gs://), or by BASE/NAME for the version newest when the process first opens it. Remote
servables go through the verified local cache the model repository uses (KILN_SERVABLE_CACHE), so
every worker process on a host downloads a version at most once and runs only files checked
against its manifest.

Rows arrive as columns, one per input: a numpy array with the batch first, or a sequence of one
value per row (numpy arrays, nested lists, numbers; text, bytes or TF Serving's {"b64": ...} for
string inputs). A column whose rows are flattened (Spark's tensor columns: 784 values for a
28x28x1 input) is given the input's shape. The engine checks dtypes and shapes, as it does for
every protocol, and splits and pads to the buckets itself.

Bad rows: a batch is scored whole; if that fails, each row is checked alone (a missing value, a
wrong shape or dtype: the engine's InvalidInput message becomes that row's error), the rows that
pass are scored together, and if that fails too each runs alone, as the micro-batcher does. Any
other failure (a broken servable, a missing column) is the job's, and raised.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.codecs.tfserving import DEFAULT_SIGNATURE, b64_bytes
from runtime.engines.base import Engine, check_inputs
from runtime.errors import ConfigError, InvalidInput, NotFound
from runtime.manifest import MANIFEST_FILE, Manifest, Signature, TensorSpec, read_manifest
from runtime.servable_cache import ServableCache
from runtime.storage import LocalStorage, Storage, open_storage, split_location

Columns = Mapping[str, Any]  # input name -> an array (batch first) or one value per row

_opened: dict[tuple[str, str, int, int | None], Engine] = {}  # (store, name, version, threads)
_named: dict[tuple[str, int | None], Engine] = {}  # (the name a caller gave, threads)
_lock = threading.Lock()
_cache: ServableCache | None = None


@dataclass(frozen=True)
class Located:
    """Where a servable lies: its store, the model's directory in it, and the version."""

    storage: Storage
    name: str
    version: int


def locate(servable: str | os.PathLike) -> Located:
    """The store, model directory and version named by BASE/NAME/VERSION, or BASE/NAME (newest)."""
    text = os.fspath(servable).rstrip("/")
    if "://" not in text:
        text = str(Path(text).resolve())  # so that a relative NAME/VERSION still has a store above it
    parent, _, last = text.rpartition("/")
    store, name = split_location(parent if last.isdigit() else text)
    storage = open_storage(store)
    return Located(storage, name, int(last) if last.isdigit() else _newest(storage, name))


def _newest(storage: Storage, name: str) -> int:
    published = [
        int(n) for n in storage.list_children(name) if n.isdigit() and storage.exists(f"{name}/{n}/{MANIFEST_FILE}")
    ]
    if not published:
        raise NotFound(
            f"{storage.url}/{name} has no published version (a NAME/VERSION directory with a {MANIFEST_FILE})"
        )
    return max(published)


def open_engine(servable: str | os.PathLike, *, threads: int | None = None) -> Engine:
    """The servable's engine, opened once per process and kept for its life: every task, UDF
    call or DoFn in a worker shares it (the engine is thread-safe), and its cached files stay pinned.
    Names are remembered as given, so a later call costs a lookup, not a store listing."""
    global _cache
    named = (os.fspath(servable), threads)
    with _lock:
        engine = _named.get(named)
        if engine is None:
            where = locate(servable)
            key = (where.storage.url, where.name, where.version, threads)
            engine = _opened.get(key)
            if engine is None:
                _cache = _cache or ServableCache()
                fetched = _cache.fetch(where.storage, where.name, where.version)
                engine = _opened[key] = Engine.open(fetched.directory, verify=not fetched.verified, threads=threads)
            _named[named] = engine
    return engine


def read_servable_manifest(servable: str | os.PathLike) -> Manifest:
    """The servable's manifest alone, for a driver building a job (return types, batch sizes)
    without downloading or opening the servable."""
    where = locate(servable)
    prefix = f"{where.name}/{where.version}"
    if isinstance(where.storage, LocalStorage):
        return read_manifest(where.storage.path(prefix))
    with tempfile.TemporaryDirectory() as scratch:  # read_manifest's checks, on the one file
        Path(scratch, MANIFEST_FILE).write_bytes(where.storage.read_bytes(f"{prefix}/{MANIFEST_FILE}"))
        return read_manifest(Path(scratch))


def batched_signature(manifest: Manifest, key: str) -> Signature:
    """The signature to score rows with: one that exists, is batched and keeps no session state."""
    signature = manifest.signatures.get(key)
    if signature is None:
        raise ConfigError(
            f"model {manifest.name} has no signature {key!r}; it has {', '.join(sorted(manifest.signatures))}"
        )
    if not signature.batched or signature.stateful:
        raise ConfigError(
            f"signature {key!r} of model {manifest.name} cannot score independent rows: "
            f"it {'has no batch dimension' if not signature.batched else 'keeps session state'}"
        )
    return signature


@dataclass(frozen=True)
class Scored:
    """A batch's outputs (every row; a bad row's values are a fill: NaN, 0, False or b"") and each
    row's error (None for a row that was scored)."""

    outputs: dict[str, np.ndarray]
    errors: list[str | None]


class Scorer:
    """One signature of a servable opened in this process, scoring batches of rows."""

    def __init__(self, engine: Engine, signature: str = DEFAULT_SIGNATURE):
        self.engine = engine
        self.key = signature
        self.signature = batched_signature(engine.manifest, signature)

    @classmethod
    def open(
        cls, servable: str | os.PathLike, signature: str = DEFAULT_SIGNATURE, *, threads: int | None = None
    ) -> Scorer:
        return cls(open_engine(servable, threads=threads), signature)

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.signature.inputs]

    def columns_of(self, rows: Sequence[Any]) -> dict[str, list]:
        """Columns from rows as TF Serving's row format has them: a mapping by input name, or,
        for a signature of one input, the value itself. A row of another kind gets None, which
        scoring reports as that row's error."""
        names = self.input_names
        if len(names) == 1:
            name = names[0]
            return {name: [row.get(name) if _by_name(row) else row for row in rows]}
        return {name: [row.get(name) if _by_name(row) else None for row in rows] for name in names}

    def score(self, columns: Columns) -> Scored:
        """Every row's outputs, or its error; raises only for what is no row's fault."""
        missing = [name for name in self.input_names if name not in columns]
        if missing:
            raise ConfigError(
                f"no column for input(s) {', '.join(missing)} of signature {self.key!r}; "
                f"columns given: {', '.join(map(str, columns)) or 'none'}"
            )
        values = {name: _indexable(columns[name]) for name in self.input_names}
        lengths = {len(column) for column in values.values()}
        if len(lengths) != 1:
            raise ConfigError(f"the input columns have different lengths: {sorted(lengths)}")
        count = lengths.pop()
        if count == 0:
            return Scored(self._filled({}, 0), [])
        try:
            return Scored(self.engine.run(self.key, self._arrays(values)), [None] * count)
        except (InvalidInput, ValueError, TypeError):
            return self._row_by_row(values, count)

    def check_row(self, row: Any) -> dict[str, np.ndarray]:
        """One row (TF Serving's row format) as the engine's inputs, a batch of one; InvalidInput
        saying what is wrong with a bad one."""
        return self._checked(self.columns_of([row]), slice(0, 1))

    def _checked(self, values: Columns, rows: slice) -> dict[str, np.ndarray]:
        return check_inputs(self.signature, self._arrays(values, rows))[0]

    def _arrays(self, values: Columns, rows: slice = slice(None)) -> dict[str, np.ndarray]:
        return {spec.name: as_column(spec, values[spec.name][rows]) for spec in self.signature.inputs}

    def _row_by_row(self, values: Columns, count: int) -> Scored:
        errors: list[str | None] = [None] * count
        checked: dict[int, dict[str, np.ndarray]] = {}
        for row in range(count):
            try:
                checked[row] = self._checked(values, slice(row, row + 1))
            except InvalidInput as e:
                errors[row] = str(e)
        scored: dict[int, dict[str, np.ndarray]] = {}
        if checked:
            merged = {name: np.concatenate([arrays[name] for arrays in checked.values()]) for name in self.input_names}
            try:
                outputs = self.engine.run(self.key, merged)
                scored = {
                    row: {name: array[i : i + 1] for name, array in outputs.items()} for i, row in enumerate(checked)
                }
            except InvalidInput:  # what no row shows alone: each runs alone, as the batcher does
                for row, arrays in checked.items():
                    try:
                        scored[row] = self.engine.run(self.key, arrays)
                    except InvalidInput as e:
                        errors[row] = str(e)
        return Scored(self._filled(scored, count), errors)

    def _filled(self, scored: dict[int, dict[str, np.ndarray]], count: int) -> dict[str, np.ndarray]:
        """Outputs of `count` rows: each scored row's values at its place, the fill elsewhere."""
        outputs = {}
        for spec in self.signature.outputs:
            first = next((result[spec.name] for result in scored.values()), None)
            if first is not None:
                inner, dtype = first.shape[1:], first.dtype
            else:  # no row to copy the shape from: one value a row where the rank is unknown
                inner = () if spec.shape is None else tuple(d or 0 for d in spec.shape[1:])
                dtype = np.dtype(object if spec.dtype == "string" else spec.dtype)
            array = np.full((count, *inner), _fill(dtype), dtype=dtype)
            for row, result in scored.items():
                array[row] = result[spec.name][0]
            outputs[spec.name] = array
        return outputs


def as_column(spec: TensorSpec, values: Any) -> np.ndarray:
    """One input's rows as one array, batch first; InvalidInput where its rows cannot be one."""
    if isinstance(values, np.ndarray) and values.dtype != object:
        array = values
    else:
        items = list(values)
        if any(_null(spec, item) for item in items):
            raise InvalidInput(f"input '{spec.name}' has no value (null or missing)")
        if spec.dtype == "string":
            items = [b64_bytes(f"input '{spec.name}'", item) if isinstance(item, dict) else item for item in items]
        try:
            array = np.array(items, dtype=object if spec.dtype == "string" else None)
        except (ValueError, TypeError) as e:
            raise InvalidInput(f"input '{spec.name}' cannot be read as one {spec.dtype} tensor: {e}") from None
    return _shaped(spec, array)


def _shaped(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    """Flattened rows (n, k) given the input's fixed inner shape, when k is its size."""
    inner = () if spec.shape is None else spec.shape[1:]  # unknown rank: rows of any shape
    fixed = tuple(d for d in inner if d is not None)
    if len(fixed) == len(inner) > 1 and array.ndim == 2 and array.shape[1] == int(np.prod(fixed)):
        return array.reshape(len(array), *fixed)
    return array


def _null(spec: TensorSpec, item: Any) -> bool:
    """None, pandas' NA, or for a string input NaN (pandas' null in a column of text)."""
    pandas = sys.modules.get("pandas")  # only a caller holding pandas values has imported it
    return (
        item is None
        or (pandas is not None and item is pandas.NA)
        or (spec.dtype == "string" and isinstance(item, float) and item != item)
    )


def _indexable(column: Any) -> np.ndarray | list:
    """A column that slices by position (a pandas Series slices by label)."""
    return column if isinstance(column, (np.ndarray, list)) else list(column)


def _by_name(row: Any) -> bool:
    return isinstance(row, Mapping) and not (set(row) == {"b64"})


def _fill(dtype: np.dtype):
    return {"f": np.nan, "c": np.nan, "b": False, "O": b"", "S": b"", "U": ""}.get(dtype.kind, 0)
