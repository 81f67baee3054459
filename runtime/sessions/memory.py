"""The in-process backend: the embedded default when no KILN_REDIS_URL is set.

Values live in a dict in this process, as bytes copied from what was stored (so a caller changing
its arrays afterwards changes nothing stored), with the same expiry and compare-and-set rules as the
Redis backend. Every operation completes without yielding to the event loop, so each is atomic.
Expired values are dropped when read and in a sweep at most once a second. Sessions here are lost
when the process ends and are not shared between instances: use Redis or Valkey for that.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from runtime.sessions.backend import Buffer, Commit
from runtime.sessions.manifest import version_of

SWEEP_SECONDS = 1.0


class MemoryBackend:
    description = "the in-process session store"

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.values: dict[str, tuple[bytes, float]] = {}  # key -> (value, expires at)
        self.swept = clock()

    async def get(self, keys: Sequence[str], expire: Mapping[str, int] | None = None) -> list[bytes | None]:
        values = [self._live(key) for key in keys]
        self._expire(expire or {})
        return values

    async def put(self, items: Sequence[tuple[str, Buffer]], ttl_ms: int) -> None:
        self._sweep()
        deadline = self.clock() + ttl_ms / 1000
        for key, value in items:
            self.values[key] = (bytes(value), deadline)

    async def expire(self, ttls: Mapping[str, int]) -> list[bool]:
        return self._expire(ttls)

    async def delete(self, keys: Sequence[str]) -> int:
        removed = 0
        for key in keys:
            removed += self._live(key) is not None
            self.values.pop(key, None)
        return removed

    async def commit(self, commit: Commit) -> tuple[bool, bytes | None]:
        await self.put(commit.chunks, commit.ttl_ms)
        current = self._live(commit.manifest_key)
        if version_of(current) != commit.expected:
            return False, current
        now = self.clock()
        self.values[commit.manifest_key] = (bytes(commit.manifest), now + commit.ttl_ms / 1000)
        if commit.history is None:
            self.values.pop(commit.history_key, None)
        else:
            self.values[commit.history_key] = (bytes(commit.history), now + commit.history_ttl_ms / 1000)
        return True, current

    async def close(self) -> None:
        pass

    def _live(self, key: str) -> bytes | None:
        entry = self.values.get(key)
        if entry is None:
            return None
        if entry[1] <= self.clock():
            del self.values[key]
            return None
        return entry[0]

    def _expire(self, ttls: Mapping[str, int]) -> list[bool]:
        now, found = self.clock(), []
        for key, ttl_ms in ttls.items():
            value = self._live(key)
            if value is not None:
                self.values[key] = (value, now + ttl_ms / 1000)
            found.append(value is not None)
        return found

    def _sweep(self) -> None:
        now = self.clock()
        if now - self.swept < SWEEP_SECONDS:
            return
        self.swept = now
        for key in [key for key, (_, deadline) in self.values.items() if deadline <= now]:
            del self.values[key]
