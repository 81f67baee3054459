"""The session services a server holds (`App.sessions`): session ids, the session store, the prediction
cache in the same storage, each servable version's fingerprint and decode loop; and whose sessions a
request may name (its tenant)."""

from __future__ import annotations

import functools
import weakref

from runtime.access import DEFAULT_TENANT
from runtime.repository import ServableHandle
from runtime.sessions.decode_loop import DecodeLoop, Observe
from runtime.sessions.ids import SessionIds
from runtime.sessions.keys import check_tenant
from runtime.sessions.prediction_cache import PredictionCache
from runtime.sessions.store import SessionStore, open_store, servable_fingerprint

SESSION_HEADER = "X-Kiln-Session"


class Sessions:
    """Where sessions live: the ids (KILN_SESSION_KEY) and the store (KILN_REDIS_URL, or in process),
    opened on first use, inside the event loop its client belongs to."""

    def __init__(
        self,
        redis_url: str | None = None,
        ttl_seconds: float | None = None,
        prediction_cache_seconds: float | None = None,
    ):
        self.redis_url, self.ttl_seconds = redis_url, ttl_seconds
        self.prediction_cache_seconds = prediction_cache_seconds
        self._store: SessionStore | None = None
        self._cache: PredictionCache | None = None
        self._fingerprints: dict[int, tuple[object, str]] = {}
        self._decoders: weakref.WeakValueDictionary[int, DecodeLoop] = weakref.WeakValueDictionary()
        if redis_url:
            _ = self.ids  # a shared store needs a shared key: refuse now, not at the first session

    @functools.cached_property
    def ids(self) -> SessionIds:
        """Read on first use with the in-process store: a server with no sessions neither needs
        KILN_SESSION_KEY nor warns of it. With Redis, read at construction: it must be set."""
        return SessionIds.from_env(shared=bool(self.redis_url))

    def store(self) -> SessionStore:
        if self._store is None:
            options = {} if self.ttl_seconds is None else {"ttl_seconds": self.ttl_seconds}
            self._store = open_store(self.redis_url, **options)
        return self._store

    def prediction_cache(self) -> PredictionCache | None:
        """The cache of stateless predictions in the same store; None when it is off (the default)."""
        if not self.prediction_cache_seconds:
            return None
        if self._cache is None:
            self._cache = PredictionCache(self.store(), ttl_seconds=self.prediction_cache_seconds)
        return self._cache

    def fingerprint(self, handle: ServableHandle) -> str:
        """The servable version's fingerprint (its name, version and manifest), read once per engine."""
        engine = handle.engine
        known = self._fingerprints.get(id(engine))
        if known is None or known[0] is not engine:
            known = (
                engine,
                servable_fingerprint(handle.name, handle.version, (engine.directory / "manifest.json").read_bytes()),
            )
            self._fingerprints[id(engine)] = known
        return known[1]

    def decoder(self, handle: ServableHandle, observe: Observe) -> DecodeLoop:
        """The servable version's decode loop, shared by the sessions generating with it; it goes
        (with its pool, and its hold on the engine) when the last of them lets go of it. `observe`
        counts its executions (runtime.runner's Runner.observe)."""
        loop = self._decoders.get(id(handle.engine))
        if loop is None or loop.handle.engine is not handle.engine:
            loop = self._decoders[id(handle.engine)] = DecodeLoop(handle, observe)
        return loop

    async def close(self) -> None:
        if self._store is not None:
            await self._store.close()


def tenant_of(authenticated: str | None, headers) -> str:
    """The tenant: the API key's, or with authentication off the X-Kiln-Tenant header's, or default."""
    return check_tenant(authenticated or headers.get("x-kiln-tenant") or DEFAULT_TENANT)
