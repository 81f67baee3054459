"""The session store: a session's model state and token history, loaded before a stateful call and
written back after it, so that any stateless instance can resume any session.

    state = await store.load(tenant, session_id, fingerprint)        # SessionState
    version = await store.save(tenant, session_id, state.version, new_tensors, history, fingerprint)

Consistency. A session has a manifest holding a version number. save() first writes the new
state's chunks under keys of its own (a random write id; see runtime.sessions.keys), then advances
the manifest from the version it worked from to the next one with a compare-and-set that also makes
sure every chunk is there (on Redis both go out in one pipeline: one round trip). Of two
requests advancing the same version at once exactly one wins; the other gets SessionConflict
(HTTP 409, gRPC ABORTED) and its chunks are removed, never referenced, so what is stored is always
one whole state. The version a winner replaced has its chunks removed right after the answer (in
a task of the event loop: drain() waits for them); chunks of a save that stopped half-way expire
with their time to live.

Time to live. Every key of a session expires `ttl_seconds` after the last load, touch or save
(a sliding expiry). The token history may be kept longer (`history_ttl_seconds`), so a session whose
state has expired can still be rebuilt from it.

Loss. load() never returns state that failed a check. It raises a SessionLost carrying `version`
(what to pass to save() as `expected_version` after rebuilding) and `history` (the token history,
or None when there is none): SessionNotFound when nothing is stored (expired, deleted, never saved),
SessionCorrupt when what is stored fails its checks or is incomplete, SessionStale when it was saved
for another servable fingerprint. With a history the caller recomputes the state; without, the
error goes to the client. StoreUnavailable (HTTP 503) when the store does not answer in time.

The fingerprint names the servable whose state this is (servable_fingerprint() makes one from the
name, version and manifest): state saved by one model version is never fed to another.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from runtime.errors import (
    ConfigError,
    InvalidInput,
    KilnError,
    SessionConflict,
    SessionCorrupt,
    SessionNotFound,
    SessionStale,
    StoreUnavailable,
)
from runtime.sessions.backend import Backend, Buffer, Commit
from runtime.sessions.encoding import Encoded, FormatError, decode, encode, pack, unpack
from runtime.sessions.keys import SessionKeys
from runtime.sessions.manifest import SessionManifest, TensorEntry, version_of
from runtime.sessions.memory import MemoryBackend

DEFAULT_TTL_SECONDS = 3600.0
DEFAULT_CHUNK_BYTES = 4 << 20
THREAD_BYTES = 1 << 20  # states larger than this are encoded, checked and decoded off the event loop
READ_ATTEMPTS = 3  # a load that finds its chunks replaced under it reads the new version, this often
HISTORY = "history"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionState:
    version: int  # pass it to save() as expected_version
    tensors: dict[str, np.ndarray]  # read-only arrays: copy one to change it
    history: np.ndarray | None  # the token history, 1-D integers (read-only), when one was saved
    fingerprint: str


def servable_fingerprint(name: str, version: int, manifest: bytes) -> str:
    """A fingerprint of one servable version: its name, version and a digest of its manifest."""
    return f"{name}/{version}/{hashlib.blake2b(manifest, digest_size=12).hexdigest()}"


class SessionStore:
    """Sessions in a backend (in-process or Redis); see the module's documentation."""

    def __init__(
        self,
        backend: Backend,
        *,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        history_ttl_seconds: float | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ):
        if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise ConfigError(f"the session chunk size must be a positive number of bytes, got {chunk_bytes!r}")
        self.backend = backend
        self.ttl_ms = _milliseconds(ttl_seconds, "time to live", ConfigError)
        self.history_ttl_ms = max(
            self.ttl_ms, _milliseconds(history_ttl_seconds or ttl_seconds, "history time to live", ConfigError)
        )
        self.chunk_bytes = chunk_bytes
        self.removals: set[asyncio.Task] = set()  # of replaced versions' chunks, after the save answered

    async def load(self, tenant: str, session_id: str, fingerprint: str) -> SessionState:
        """The session's state, checked whole, and its time to live extended; or a SessionLost
        (SessionNotFound, SessionCorrupt, SessionStale) saying why not, or StoreUnavailable."""
        keys = SessionKeys(tenant, session_id)
        for _ in range(READ_ATTEMPTS):
            manifest_value, history_value = await self.backend.get([keys.manifest, keys.history])
            version = version_of(manifest_value)
            history, history_problem = _history(history_value)
            named = f"session {session_id}"
            if manifest_value is None:
                raise SessionNotFound(
                    f"{named} has no stored state: it expired, was deleted, or was never saved", history=history
                )
            try:
                manifest = SessionManifest.from_value(manifest_value)
            except FormatError as e:
                raise SessionCorrupt(f"{named}: {e}", version=version, history=history) from None
            if history_problem or (manifest.history and history is None):
                raise SessionCorrupt(f"{named}: its token history is {history_problem or 'missing'}", version=version)
            if manifest.fingerprint != fingerprint:
                raise SessionStale(
                    f"{named} holds the state of servable {manifest.fingerprint}, not of {fingerprint}",
                    version=version,
                    history=history,
                )
            chunk_keys = _chunk_keys(manifest, keys)
            values = await self.backend.get(chunk_keys, _ttls(manifest, keys, chunk_keys))
            if any(value is None for value in values):
                if (await self.backend.get([keys.manifest]))[0] != manifest_value:
                    continue  # replaced by a newer version while this load read it: read that one
                raise SessionCorrupt(
                    f"{named}: part of its state is missing from the store (evicted?)", version=version, history=history
                )
            present = [value for value in values if value is not None]  # all of them, as checked
            try:
                tensors = await _off_loop(sum(map(len, present)), _decode, manifest, present)
            except FormatError as e:
                raise SessionCorrupt(f"{named}: {e}", version=version, history=history) from None
            return SessionState(version, tensors, history, fingerprint)
        raise SessionConflict(f"session {session_id} changed {READ_ATTEMPTS} times while it was being read; try again")

    async def save(
        self,
        tenant: str,
        session_id: str,
        expected_version: int,
        tensors: Mapping[str, np.ndarray],
        history: Sequence[int] | np.ndarray | None,
        fingerprint: str,
        *,
        ttl_seconds: float | None = None,
    ) -> int:
        """Store `tensors` (and the token `history`, None for none) as the version after
        `expected_version` (0 for a new session, else what load() or a SessionLost said), and answer
        the new version. Raises SessionConflict when the session is no longer at `expected_version`:
        then nothing of this call is stored."""
        keys = SessionKeys(tenant, session_id)
        if not isinstance(expected_version, int) or expected_version < 0:
            raise InvalidInput(f"a session's expected version is 0 or more, got {expected_version!r}")
        ttl_ms = self.ttl_ms if ttl_seconds is None else _milliseconds(ttl_seconds, "time to live")
        history_ttl_ms = max(ttl_ms, self.history_ttl_ms)
        names = list(tensors)
        for name in names:
            if not isinstance(name, str) or not name:
                raise InvalidInput(f"session tensor names must be non-empty strings, got {name!r}")
        size = sum(np.asarray(array).nbytes for array in tensors.values())
        encoded: list[Encoded] = await _off_loop(
            size, lambda: [encode(name, tensors[name], fingerprint, self.chunk_bytes) for name in names]
        )
        history_value = None if history is None else pack(HISTORY, _history_array(history))
        write_id = secrets.token_hex(8)
        entries = tuple(TensorEntry(name=name, chunks=len(e.chunks)) for name, e in zip(names, encoded))
        manifest = SessionManifest(
            version=expected_version + 1,
            write_id=write_id,
            fingerprint=fingerprint,
            ttl_ms=ttl_ms,
            history_ttl_ms=history_ttl_ms,
            history=history is not None,
            tensors=entries,
        )
        items = [
            (key, value)
            for tensor_keys, e in zip(manifest.chunk_keys(keys), encoded)
            for key, value in zip(tensor_keys, _values(e))
        ]
        value = manifest.value()
        won, replaced = await self.backend.commit(
            Commit(items, ttl_ms, keys.manifest, expected_version, value, keys.history, history_value, history_ttl_ms)
        )
        if not won and replaced != value:  # (equal: this very save, applied before a lost answer)
            await self._discard([key for key, _ in items])
            raise SessionConflict(
                f"session {session_id} is at version {version_of(replaced)}, but this request "
                f"worked from version {expected_version}: another request advanced it first; "
                f"nothing of this one was stored"
            )
        if won and replaced is not None:
            try:
                old = _chunk_keys(SessionManifest.from_value(replaced), keys)
            except FormatError:
                old = []  # whatever it pointed to expires with its time to live
            if old:  # off the request's path: one round trip fewer before the answer
                removal = asyncio.get_running_loop().create_task(self._discard(old))
                self.removals.add(removal)
                removal.add_done_callback(self.removals.discard)
        return manifest.version

    async def delete(self, tenant: str, session_id: str) -> bool:
        """Remove the session, state and history; whether there was one."""
        keys = SessionKeys(tenant, session_id)
        manifest = await self._manifest(keys)
        doomed = [keys.manifest, keys.history, *(_chunk_keys(manifest, keys) if manifest else [])]
        return await self.backend.delete(doomed) > 0

    async def touch(self, tenant: str, session_id: str) -> bool:
        """Extend the session's time to live without reading its state; whether there is one."""
        keys = SessionKeys(tenant, session_id)
        manifest = await self._manifest(keys)
        if manifest is None:
            return False
        return (await self.backend.expire(_ttls(manifest, keys, _chunk_keys(manifest, keys))))[0]

    async def drain(self) -> None:
        """Wait until the chunks of replaced versions are removed."""
        while self.removals:
            await asyncio.gather(*self.removals)

    async def close(self) -> None:
        await self.drain()
        await self.backend.close()

    async def _manifest(self, keys: SessionKeys) -> SessionManifest | None:
        """The session's manifest; None when there is none or it is unreadable (then the chunks it
        may point to expire with their time to live)."""
        (value,) = await self.backend.get([keys.manifest])
        try:
            return None if value is None else SessionManifest.from_value(value)
        except FormatError:
            return None

    async def _discard(self, keys: list[str]) -> None:
        """Remove chunks no manifest points to; if the store fails now, they expire by themselves."""
        try:
            await self.backend.delete(keys)
        except StoreUnavailable as e:
            log.info("could not remove %d unreferenced session chunks (they expire by themselves): %s", len(keys), e)


class MemoryStore(SessionStore):
    """Sessions in this process: the embedded default."""

    def __init__(self, **options):
        super().__init__(MemoryBackend(), **options)


class RedisStore(SessionStore):
    """Sessions in Redis 7 or Valkey at `url` (redis://, rediss://, unix://; a cluster at redis:// is
    found by itself, or named by redis+cluster:// or rediss+cluster://)."""

    def __init__(self, url: str, *, timeout_seconds: float | None = None, **options):
        from runtime.sessions.redis_backend import DEFAULT_TIMEOUT_SECONDS, RedisBackend

        super().__init__(RedisBackend(url, timeout_seconds=timeout_seconds or DEFAULT_TIMEOUT_SECONDS), **options)


def open_store(url: str | None, **options) -> SessionStore:
    """RedisStore at `url`, or MemoryStore when there is none. Options: ttl_seconds,
    history_ttl_seconds, chunk_bytes, and for Redis timeout_seconds."""
    if url:
        return RedisStore(url, **options)
    options.pop("timeout_seconds", None)
    return MemoryStore(**options)


def _chunk_keys(manifest: SessionManifest, keys: SessionKeys) -> list[str]:
    return [key for tensor_keys in manifest.chunk_keys(keys) for key in tensor_keys]


def _ttls(manifest: SessionManifest, keys: SessionKeys, chunk_keys: list[str]) -> dict[str, int]:
    """The time to live every key of the session gets on a load or touch: the manifest's first."""
    ttls = dict.fromkeys([keys.manifest, *chunk_keys], manifest.ttl_ms)
    if manifest.history:
        ttls[keys.history] = manifest.history_ttl_ms
    return ttls


def _values(encoded: Encoded) -> list[Buffer]:
    """A stored tensor's values in key order: its header, then its data chunks."""
    return [encoded.header, *encoded.chunks]


def _decode(manifest: SessionManifest, values: list[bytes]) -> dict[str, np.ndarray]:
    tensors, offset = {}, 0
    for entry in manifest.tensors:
        header, array = decode(values[offset], values[offset + 1 : offset + 1 + entry.chunks])
        offset += 1 + entry.chunks
        if header.name != entry.name or header.fingerprint != manifest.fingerprint:
            raise FormatError(
                f"the stored tensor {header.name!r} of {header.fingerprint!r} is not the manifest's "
                f"{entry.name!r} of {manifest.fingerprint!r}"
            )
        tensors[entry.name] = array
    return tensors


def _history(value: bytes | None) -> tuple[np.ndarray | None, str | None]:
    """The token history in a stored value, or what is wrong with it."""
    if value is None:
        return None, None
    try:
        [(header, array)] = unpack(value)
    except ValueError as e:  # FormatError, or not exactly one tensor
        return None, f"corrupt: {e}"
    if header.name != HISTORY or header.fingerprint or array.ndim != 1 or array.dtype.kind not in "iu":
        return None, f"not a token history ({header.name!r}, {array.dtype}, shape {list(array.shape)})"
    return array, None


def _history_array(history: Sequence[int] | np.ndarray) -> np.ndarray:
    array = np.asarray(history)
    if array.ndim == 1 and array.size == 0:
        array = array.astype(np.int64)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise InvalidInput(f"a token history is a list of integers, got {array.dtype} of shape {list(array.shape)}")
    return array


async def _off_loop(size: int, function, *args):
    """function(*args), in a worker thread when `size` bytes make it long enough to hold up the loop."""
    return await asyncio.to_thread(function, *args) if size > THREAD_BYTES else function(*args)


def _milliseconds(seconds: float, what: str, error: type[KilnError] = InvalidInput) -> int:
    if not isinstance(seconds, (int, float)) or not seconds > 0:
        raise error(f"a session {what} must be a positive number of seconds, got {seconds!r}")
    return max(1, round(seconds * 1000))
