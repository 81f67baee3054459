"""Agent sessions: model state (RNN state, a transformer's K/V cache) and token history kept in
Redis-compatible storage between requests, so any stateless instance can resume any session.

    ids.py               session ids bound to their tenant by an HMAC (KILN_SESSION_KEY)
    keys.py              key names per tenant and session, with a cluster hash tag; safe characters
    encoding.py          the stored tensor format: validated header, raw little-endian bytes, chunks
    manifest.py          a session's versioned manifest
    backend.py           what a store needs from its storage
    memory.py            the in-process backend (the embedded default)
    redis_backend.py     Redis 7 or Valkey through redis-py's asyncio client (KILN_REDIS_URL)
    store.py             load, save (compare-and-set), delete, touch; loss and conflicts
    prediction_cache.py  an optional cache of stateless predictions in the same storage
    state.py             a stateful signature's state: a new session's, after a call, as stored
    predict.py           predicting with a stateful signature in a session (:predict, OIP infer)
    generate.py          :generate over a prefill and decode pair, its state per session
    decode_loop.py       continuous batching: sessions' calls over a resident state pool
    services.py          the session services a server holds (App.sessions), and a request's tenant
"""

from runtime.sessions.ids import SessionIds
from runtime.sessions.store import MemoryStore, RedisStore, SessionState, SessionStore, open_store, servable_fingerprint

__all__ = [
    "MemoryStore",
    "RedisStore",
    "SessionIds",
    "SessionState",
    "SessionStore",
    "open_store",
    "servable_fingerprint",
]
