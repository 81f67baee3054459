"""What a session store needs from the storage under it: a handful of key-value operations, each
one round trip, with expiry in milliseconds, and one compare-and-set.

Two backends: runtime.sessions.memory (in-process, the embedded default) and
runtime.sessions.redis_backend (Redis 7 or Valkey by URL). Both raise StoreUnavailable, and only
that, when the storage cannot answer or did not store what it was given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class Commit:
    """One save: `chunks` written (each expiring in `ttl_ms`), then, atomically when the manifest at
    `manifest_key` is still at version `expected` (manifest.version_of, 0 when there is none) and every
    chunk is there, `manifest` set and the history set (removed when None)."""

    chunks: Sequence[tuple[str, Buffer]]
    ttl_ms: int
    manifest_key: str
    expected: int
    manifest: bytes
    history_key: str
    history: bytes | None
    history_ttl_ms: int


class Backend(Protocol):
    description: str  # for messages: what and where, never a password

    async def get(self, keys: Sequence[str], expire: Mapping[str, int] | None = None) -> list[bytes | None]:
        """The values of `keys` (None where missing), and in the same round trip a new time to live
        (ms) for each key of `expire` that exists."""

    async def put(self, items: Sequence[tuple[str, Buffer]], ttl_ms: int) -> None:
        """Set every key to its value, each expiring in `ttl_ms`."""

    async def expire(self, ttls: Mapping[str, int]) -> list[bool]:
        """A new time to live (ms) per key; whether each key existed."""

    async def delete(self, keys: Sequence[str]) -> int:
        """Remove the keys (all of one session, or one prediction); how many existed."""

    async def commit(self, commit: Commit) -> tuple[bool, bytes | None]:
        """Apply `commit`: (True, the manifest it replaced) when it won; else, with no manifest or
        history changed, (False, the current manifest). One round trip where the storage allows it."""

    async def close(self) -> None:
        """Let go of connections."""
