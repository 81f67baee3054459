"""The Redis backend: Redis 7 or Valkey by URL (KILN_REDIS_URL), through redis-py's asyncio client, a
single server's or a cluster's (runtime.sessions.redis_client).

Only commands both servers have: GET, SET with PX, PEXPIRE, UNLINK, and one Lua script run by
EVALSHA (SCRIPT LOAD when the server does not know it yet), whose own calls are GET, EXISTS, SET and
DEL. Several commands for one call go out as one pipeline (no MULTI: a pipeline of independent
commands), so reading a chunked state, or writing it with its compare-and-set, is one round trip.
redis-py is imported only when a store is opened with a URL.

Nothing waits forever: every socket operation has a timeout (KILN_REDIS_TIMEOUT_SECONDS), a broken
connection is retried once at once on a fresh one (a restarted server is reached again on the next
call), and any failure becomes StoreUnavailable naming the store (never its password).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from runtime.errors import ConfigError, StoreUnavailable
from runtime.sessions import redis_client
from runtime.sessions.backend import Buffer, Commit

DEFAULT_TIMEOUT_SECONDS = 5.0
SCHEMES = ("redis", "rediss", "unix", *redis_client.CLUSTER_SCHEMES)

# KEYS: manifest, history, then every chunk the new manifest points to. ARGV: expected version, new
# manifest, its ttl (ms), history ('' to remove it), its ttl (ms). The version is the manifest's
# leading digits before a newline, 0 when there are none (manifest.version_of). Answers
# {1, replaced manifest}, {0, current manifest} (another version), or {-1, a chunk key} (not stored).
COMMIT = """
local current = redis.call('GET', KEYS[1])
local version = 0
if current then
  version = tonumber(string.match(current, '^(%d+)\\n') or '0')
end
if version ~= tonumber(ARGV[1]) then
  return {0, current}
end
for i = 3, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    return {-1, KEYS[i]}
  end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if ARGV[4] == '' then
  redis.call('DEL', KEYS[2])
else
  redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
end
return {1, current}
"""


class RedisBackend:
    def __init__(self, url: str, *, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS):
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES:
            raise ConfigError(
                f"the session store URL must start with {', '.join(s + '://' for s in SCHEMES)}; got {redact(url)!r}"
            )
        if not timeout_seconds > 0:
            raise ConfigError(f"the session store timeout must be positive, got {timeout_seconds}")
        self.description = f"the session store at {redact(url)}"
        self.url, self.options = (
            url,
            {
                "socket_timeout": timeout_seconds,
                "socket_connect_timeout": timeout_seconds,
                "retry": Retry(NoBackoff(), 1),
            },
        )
        self.client = self.script = None  # on first use: which client depends on the server (redis_client)
        self._connecting = asyncio.Lock()

    async def connected(self):
        """The client, opened on first use."""
        async with self._connecting:
            if self.client is None:
                client = await redis_client.connect(self.url, **self.options)
                self.client, self.script = client, client.register_script(COMMIT)
        return self.client

    async def get(self, keys: Sequence[str], expire: Mapping[str, int] | None = None) -> list[bytes | None]:
        # Expiries first, then a GET per key: measured faster than one MGET, than GETEX, and than
        # small replies queued behind large ones (load/session_store.py).
        expire = expire or {}
        replies = await self._pipeline(
            "read", [("PEXPIRE", key, ttl) for key, ttl in expire.items()], [("GET", key) for key in keys]
        )
        return replies[len(expire) :]

    async def put(self, items: Sequence[tuple[str, Buffer]], ttl_ms: int) -> None:
        await self._pipeline("write", [("SET", key, value, "PX", ttl_ms) for key, value in items])

    async def expire(self, ttls: Mapping[str, int]) -> list[bool]:
        return [bool(found) for found in await self._pipeline("touch", [("PEXPIRE", k, t) for k, t in ttls.items()])]

    async def delete(self, keys: Sequence[str]) -> int:
        async def run():
            return await (await self.connected()).unlink(*keys)

        return await self._call("delete", run()) if keys else 0

    async def commit(self, commit: Commit) -> tuple[bool, bytes | None]:
        keys = [commit.manifest_key, commit.history_key, *(key for key, _ in commit.chunks)]
        history = b"" if commit.history is None else commit.history
        args = [commit.expected, commit.manifest, commit.ttl_ms, history, commit.history_ttl_ms]

        async def run():
            # One pipeline: the server runs a connection's commands in order, so every chunk is
            # written before the script looks for them and sets the manifest.
            async with (await self.connected()).pipeline(transaction=False) as pipe:
                for key, value in commit.chunks:
                    pipe.execute_command("SET", key, value, "PX", commit.ttl_ms)
                pipe.execute_command("EVALSHA", self.script.sha, len(keys), *keys, *args)
                replies = await pipe.execute(raise_on_error=False)
            if isinstance(replies[-1], NoScriptError):  # a server new to the script, or restarted
                replies[-1] = await self.script(keys=keys, args=args)
            return replies

        replies = await self._call("write", run())
        if isinstance(replies[-1], Exception) or replies[-1][0] == -1:  # no manifest was changed
            failure = next(reply for reply in [*replies, None] if reply is None or isinstance(reply, Exception))
            raise StoreUnavailable(
                f"{self.description} did not store a session's state: "
                f"{f'{type(failure).__name__}: {failure}' if failure else 'a chunk is missing'}"
            )
        won, current = replies[-1]
        return won == 1, current

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    async def _pipeline(self, what: str, *groups: list[tuple]) -> list:
        commands = [command for group in groups for command in group]
        if not commands:
            return []

        async def run():
            async with (await self.connected()).pipeline(transaction=False) as pipe:
                for command in commands:
                    pipe.execute_command(*command)
                return await pipe.execute()

        return await self._call(what, run())

    async def _call(self, what: str, awaitable):
        try:
            return await awaitable
        except (TimeoutError, RedisError, OSError) as e:
            raise StoreUnavailable(f"{self.description} did not answer a {what}: {type(e).__name__}: {e}") from None


def redact(url: str) -> str:
    """`url` without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
