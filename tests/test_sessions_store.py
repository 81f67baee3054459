"""The session store against a real redis-server on loopback and in process: both pass the same
behavioural tests (round trip, conflicts, concurrent writers, expiry and sliding expiry, delete,
tenants, corruption of every part, a model version change); Redis alone is also stopped, frozen and
restarted in the middle of a session, raced by two writer processes, and limited by an ACL to the
commands Redis 7 and Valkey share."""

from __future__ import annotations

import asyncio
import multiprocessing

import numpy as np
import pytest
from redis.asyncio.cluster import RedisCluster

from runtime.errors import (InvalidInput, KilnError, PermissionDenied, SessionConflict, SessionCorrupt, SessionLost,
                            SessionNotFound, SessionStale, StoreUnavailable, status_of)
from runtime.sessions import MemoryStore, RedisStore, SessionIds, SessionStore, open_store, servable_fingerprint
from runtime.sessions.keys import SessionKeys
from runtime.sessions.memory import MemoryBackend

FINGERPRINT = servable_fingerprint("agent", 1, b'{"name": "agent"}')
OTHER_FINGERPRINT = servable_fingerprint("agent", 2, b'{"name": "agent", "version": 2}')
IDS = SessionIds([b"k" * 32])
run = asyncio.run
pytest_plugins = ["tests.redis_server"]  # its fixtures: redis_server, redis_cluster, own_redis_server


def state(seed: int = 0, rows: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"k_cache": rng.standard_normal((2, rows, 8)).astype(np.float32),
            "v_cache": rng.standard_normal((2, rows, 8)).astype(np.float16),
            "step": np.int64(rows), "mask": rng.random(rows) > 0.5}


def assert_state(loaded: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert loaded.keys() == expected.keys()
    for name, array in expected.items():
        array = np.asarray(array)
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
        assert loaded[name].tobytes() == array.tobytes(), name


def chunk_count(tensors: dict[str, np.ndarray], chunk_bytes: int) -> int:
    """How many values a state takes: per tensor a header and its data chunks."""
    return sum(1 + -(-np.asarray(array).nbytes // chunk_bytes) for array in tensors.values())


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
def make_store(request):
    """A function making a store (inside the test's event loop) of the kind the test runs with; the
    stores one test makes share their storage, as instances sharing one Redis do. The cluster's URL
    is a plain redis:// one to a node, as ElastiCache's configuration endpoint is: found a cluster."""
    if request.param == "memory":
        backend = MemoryBackend()
        return lambda **options: SessionStore(backend, **options)
    url = request.getfixturevalue("redis_server" if request.param == "redis" else "redis_cluster").url
    return lambda **options: RedisStore(url, **options)


async def session_keys(store: SessionStore, tenant: str, session: str) -> set[str]:
    """Every key the store holds for the session (read under the store, not through it)."""
    base = SessionKeys(tenant, session).base
    if isinstance(store.backend, MemoryBackend):
        return {key for key in store.backend.values if key.startswith(base)}
    client = await store.backend.connected()
    if isinstance(client, RedisCluster):  # a session's keys share one slot: ask its shard
        node = client.get_node_from_key(base)
        return {key.decode() async for key in client.scan_iter(match=base + "*", target_nodes=node)}
    return {key.decode() async for key in client.scan_iter(match=base + "*")}


async def rewrite(store: SessionStore, key: str, change) -> None:
    """Replace a stored value with change(value) (None removes it), keeping its expiry, directly in
    the storage."""
    if isinstance(store.backend, MemoryBackend):
        value, deadline = store.backend.values.pop(key)
        new = change(value)
        if new is not None:
            store.backend.values[key] = (new, deadline)
        return
    client = await store.backend.connected()
    new = change(await client.get(key))
    await (client.delete(key) if new is None else client.set(key, new, keepttl=True))


def test_errors_map_to_their_statuses():
    assert status_of(SessionConflict("x")) == (409, "ABORTED")
    assert status_of(SessionNotFound("x")) == (404, "NOT_FOUND")
    assert status_of(SessionStale("x")) == (412, "FAILED_PRECONDITION")
    assert status_of(SessionCorrupt("x")) == (500, "DATA_LOSS")
    assert status_of(StoreUnavailable("x")) == (503, "UNAVAILABLE")


def test_a_new_session_is_saved_loaded_and_advanced(make_store):
    async def scenario():
        store, session = make_store(), IDS.new("acme")
        with pytest.raises(SessionNotFound) as lost:
            await store.load("acme", session, FINGERPRINT)
        assert (lost.value.version, lost.value.history) == (0, None)
        assert await store.save("acme", session, 0, state(1), [5, 6, 7], FINGERPRINT) == 1
        loaded = await store.load("acme", session, FINGERPRINT)
        assert loaded.version == 1 and loaded.history.tolist() == [5, 6, 7]
        assert_state(loaded.tensors, state(1))
        assert not any(array.flags.writeable for array in loaded.tensors.values())
        assert await store.save("acme", session, loaded.version, state(2, rows=6), [5, 6, 7, 8], FINGERPRINT) == 2
        loaded = await store.load("acme", session, FINGERPRINT)
        assert loaded.version == 2 and loaded.history.tolist() == [5, 6, 7, 8]
        assert_state(loaded.tensors, state(2, rows=6))
        await store.close()

    run(scenario())


def test_a_saved_state_is_a_copy_of_the_callers_arrays(make_store):
    async def scenario():
        store, session, tensors = make_store(), IDS.new("acme"), state(3)
        await store.save("acme", session, 0, tensors, None, FINGERPRINT)
        tensors["k_cache"][:] = 0
        loaded = await store.load("acme", session, FINGERPRINT)
        assert loaded.history is None
        assert_state(loaded.tensors, state(3))
        await store.close()

    run(scenario())


def test_a_large_state_is_chunked_and_every_dtype_round_trips(make_store):
    tensors = {"big": np.arange(300_000, dtype=np.float64), "empty": np.zeros((0, 4), np.int8),
               "scalar": np.complex128(1 - 2j), "bools": np.array([True, False]),
               "u64": np.array([2**64 - 1], np.uint64),
               "half": np.array([np.nan, np.inf], np.float16), "c64": np.ones((2, 2), np.complex64)}

    async def scenario():
        store, session = make_store(chunk_bytes=64 << 10), IDS.new("acme")
        await store.save("acme", session, 0, tensors, np.arange(100_000, dtype=np.int32), FINGERPRINT)
        loaded = await store.load("acme", session, FINGERPRINT)
        assert_state(loaded.tensors, tensors)
        assert loaded.history.dtype == np.int32 and loaded.history.tolist() == list(range(100_000))
        assert len(await session_keys(store, "acme", session)) == 2 + chunk_count(tensors, 64 << 10)
        await store.close()

    run(scenario())


def test_a_save_from_an_old_version_conflicts_and_changes_nothing(make_store):
    async def scenario():
        store, session = make_store(), IDS.new("acme")
        await store.save("acme", session, 0, state(1), [1], FINGERPRINT)
        before = await session_keys(store, "acme", session)
        for expected in (0, 2, 7):
            with pytest.raises(SessionConflict, match=f"at version 1, but this request worked from version {expected}"):
                await store.save("acme", session, expected, state(9), [9], FINGERPRINT)
        assert await session_keys(store, "acme", session) == before  # the losers' chunks are gone
        loaded = await store.load("acme", session, FINGERPRINT)
        assert loaded.version == 1 and loaded.history.tolist() == [1]
        assert_state(loaded.tensors, state(1))
        await store.close()

    run(scenario())


def test_of_two_concurrent_writers_exactly_one_wins_and_only_its_state_is_stored(make_store):
    async def scenario():
        stores = [make_store(chunk_bytes=32 << 10), make_store(chunk_bytes=32 << 10)]  # two clients
        session = IDS.new("acme")
        await stores[0].save("acme", session, 0, state(0), [0], FINGERPRINT)
        for round_ in range(1, 6):
            version = (await stores[0].load("acme", session, FINGERPRINT)).version
            tensors = [state(10 * round_ + i, rows=4096) for i in range(2)]
            results = await asyncio.gather(*(store.save("acme", session, version, tensors[i], [round_, i], FINGERPRINT)
                                             for i, store in enumerate(stores)), return_exceptions=True)
            winners = [i for i, result in enumerate(results) if result == version + 1]
            assert len(winners) == 1, results
            assert isinstance(results[1 - winners[0]], SessionConflict)
            loaded = await stores[1].load("acme", session, FINGERPRINT)
            assert loaded.version == version + 1 and loaded.history.tolist() == [round_, winners[0]]
            assert_state(loaded.tensors, tensors[winners[0]])
        for store in stores:
            await store.drain()  # the removal of replaced versions, which runs after a save answers
        keys = await session_keys(stores[0], "acme", session)
        assert len(keys) == 2 + chunk_count(tensors[0], 32 << 10)  # nothing of the losers or old versions left
        for store in stores:
            await store.close()

    run(scenario())


def test_a_load_racing_a_save_reads_one_whole_version(make_store):
    """The save lands (and removes the old chunks) between the load's manifest and chunk reads."""

    async def scenario():
        store, writer, session = make_store(), make_store(), IDS.new("acme")
        await store.save("acme", session, 0, state(1), [1], FINGERPRINT)
        real_get, calls = store.backend.get, []

        async def get(keys, expire=None):
            calls.append(keys)
            if len(calls) == 2:
                await writer.save("acme", session, 1, state(2), [1, 2], FINGERPRINT)
                await writer.drain()  # the chunks this load is about to read are gone
            return await real_get(keys, expire)

        store.backend.get = get
        loaded = await store.load("acme", session, FINGERPRINT)
        assert loaded.version == 2 and loaded.history.tolist() == [1, 2]
        assert_state(loaded.tensors, state(2))
        await store.close()
        await writer.close()

    run(scenario())


def test_a_save_whose_answer_was_lost_after_it_applied_still_counts(make_store):
    """A connection dropped after the compare-and-set ran, and the retried call finds the session
    already at this save's manifest: that is this save winning, not a conflict."""

    async def scenario():
        store, session = make_store(), IDS.new("acme")
        real_commit = store.backend.commit

        async def commit(*args):
            await real_commit(*args)
            return await real_commit(*args)

        store.backend.commit = commit
        assert await store.save("acme", session, 0, state(4), [4], FINGERPRINT) == 1
        assert_state((await store.load("acme", session, FINGERPRINT)).tensors, state(4))
        await store.close()

    run(scenario())


def test_delete_removes_every_key(make_store):
    async def scenario():
        store, session = make_store(), IDS.new("acme")
        await store.save("acme", session, 0, state(1), [1], FINGERPRINT)
        assert await store.delete("acme", session) is True
        assert await session_keys(store, "acme", session) == set()
        with pytest.raises(SessionNotFound):
            await store.load("acme", session, FINGERPRINT)
        assert await store.delete("acme", session) is False
        assert await store.save("acme", session, 0, state(2), None, FINGERPRINT) == 1
        await store.close()

    run(scenario())


def test_a_session_expires_after_its_time_to_live(make_store):
    async def scenario():
        store, session = make_store(ttl_seconds=0.3), IDS.new("acme")
        await store.save("acme", session, 0, state(1), [1], FINGERPRINT)
        await asyncio.sleep(0.6)
        with pytest.raises(SessionNotFound) as lost:
            await store.load("acme", session, FINGERPRINT)
        assert lost.value.history is None and lost.value.version == 0
        assert await session_keys(store, "acme", session) == set() or isinstance(store.backend, MemoryBackend)
        assert await store.touch("acme", session) is False
        await store.close()

    run(scenario())


def test_loads_and_touches_slide_the_expiry(make_store):
    async def scenario():
        store, session = make_store(ttl_seconds=1.5), IDS.new("acme")
        await store.save("acme", session, 0, state(1), [1], FINGERPRINT)
        await asyncio.sleep(1.0)
        await store.load("acme", session, FINGERPRINT)
        await asyncio.sleep(1.0)  # 2 s after the save: alive only because the load extended it
        assert await store.touch("acme", session) is True
        await asyncio.sleep(1.0)
        loaded = await store.load("acme", session, FINGERPRINT)
        assert_state(loaded.tensors, state(1))
        assert loaded.history.tolist() == [1]
        await store.close()

    run(scenario())


def test_a_save_may_set_its_own_time_to_live(make_store):
    async def scenario():
        store, session = make_store(ttl_seconds=60), IDS.new("acme")
        await store.save("acme", session, 0, state(1), None, FINGERPRINT, ttl_seconds=0.2)
        await asyncio.sleep(0.5)
        with pytest.raises(SessionNotFound):
            await store.load("acme", session, FINGERPRINT)
        await store.close()

    run(scenario())


def test_the_history_can_outlive_the_state_and_rebuild_it(make_store):
    async def scenario():
        store, session = make_store(ttl_seconds=0.3, history_ttl_seconds=30), IDS.new("acme")
        await store.save("acme", session, 0, state(1), [3, 1, 4], FINGERPRINT)
        await asyncio.sleep(0.6)
        with pytest.raises(SessionNotFound) as lost:
            await store.load("acme", session, FINGERPRINT)
        assert lost.value.history.tolist() == [3, 1, 4] and lost.value.version == 0
        rebuilt = state(1)  # what the caller recomputes from the history
        assert await store.save("acme", session, lost.value.version, rebuilt, [3, 1, 4, 1], FINGERPRINT) == 1
        assert (await store.load("acme", session, FINGERPRINT)).history.tolist() == [3, 1, 4, 1]
        await store.close()

    run(scenario())


def test_state_of_another_servable_version_is_stale_and_replaced(make_store):
    async def scenario():
        store, session = make_store(), IDS.new("acme")
        await store.save("acme", session, 0, state(1), [2, 7], FINGERPRINT)
        with pytest.raises(SessionStale, match="agent/1/") as lost:
            await store.load("acme", session, OTHER_FINGERPRINT)
        assert lost.value.version == 1 and lost.value.history.tolist() == [2, 7]
        assert await store.save("acme", session, lost.value.version, state(2), [2, 7], OTHER_FINGERPRINT) == 2
        assert_state((await store.load("acme", session, OTHER_FINGERPRINT)).tensors, state(2))
        with pytest.raises(SessionStale):
            await store.load("acme", session, FINGERPRINT)
        await store.close()

    run(scenario())


def test_tenants_never_see_each_others_sessions(make_store):
    async def scenario():
        store, session = make_store(), IDS.new("acme")
        await store.save("acme", session, 0, state(1), [1], FINGERPRINT)
        with pytest.raises(PermissionDenied):
            IDS.check("globex", session)  # the id itself is refused for another tenant...
        with pytest.raises(SessionNotFound):  # ...and even used directly, it names another namespace
            await store.load("globex", session, FINGERPRINT)
        assert await store.touch("globex", session) is False
        assert await store.delete("globex", session) is False
        assert await store.save("globex", session, 0, state(2), [2], FINGERPRINT) == 1
        assert_state((await store.load("acme", session, FINGERPRINT)).tensors, state(1))
        assert_state((await store.load("globex", session, FINGERPRINT)).tensors, state(2))
        assert all(key.startswith("kiln:{globex:") for key in await session_keys(store, "globex", session))
        await store.close()

    run(scenario())


@pytest.mark.parametrize("call", [
    lambda store: store.load("a:b", "s1", FINGERPRINT),
    lambda store: store.load("acme", "s1}x", FINGERPRINT),
    lambda store: store.save("acme", "s1", -1, state(), None, FINGERPRINT),
    lambda store: store.save("acme", "s1", 0, {"x": np.array(["text"])}, None, FINGERPRINT),
    lambda store: store.save("acme", "s1", 0, {"": np.zeros(1)}, None, FINGERPRINT),
    lambda store: store.save("acme", "s1", 0, state(), [0.5, 1.5], FINGERPRINT),
    lambda store: store.save("acme", "s1", 0, state(), [[1, 2]], FINGERPRINT),
    lambda store: store.save("acme", "s1", 0, state(), None, FINGERPRINT, ttl_seconds=0),
], ids=["tenant", "session", "version", "dtype", "name", "float-history", "2d-history", "ttl"])
def test_bad_arguments_are_invalid_input_and_store_nothing(make_store, call):
    async def scenario():
        store = make_store()
        with pytest.raises(InvalidInput):
            await call(store)
        assert await session_keys(store, "acme", "s1") == set()
        await store.close()

    run(scenario())


def flip(offset: int):
    def change(value: bytes) -> bytes:
        value = bytearray(value)
        value[offset] ^= 0x10
        return bytes(value)
    return change


# (what to damage: "manifest", "history" or "chunk T P" (tensor T, part P; 0 is the header), how,
#  the error, whether the history survives, the version a rebuilt state is saved over)
CORRUPTIONS = {
    "data-byte": ("chunk 0 2", flip(10), SessionCorrupt, "checksum", True, 1),
    "header-byte": ("chunk 1 0", flip(20), SessionCorrupt, None, True, 1),
    "truncated": ("chunk 0 1", lambda v: v[:-1], SessionCorrupt, "data bytes", True, 1),
    "chunk-gone": ("chunk 0 3", lambda v: None, SessionCorrupt, "missing", True, 1),
    "header-gone": ("chunk 2 0", lambda v: None, SessionCorrupt, "missing", True, 1),
    "pickle": ("chunk 0 0", lambda v: b"\x80\x04\x95" + v[3:], SessionCorrupt, "not a stored tensor", True, 1),
    "manifest-json": ("manifest", lambda v: v[:-5], SessionCorrupt, "manifest is unreadable", True, 1),
    "manifest-garbage": ("manifest", lambda v: b"\xff\xfe garbage", SessionCorrupt, "unreadable", True, 0),
    "history-byte": ("history", flip(60), SessionCorrupt, "history is corrupt", False, 1),
    "history-gone": ("history", lambda v: None, SessionCorrupt, "history is missing", False, 1),
}


@pytest.mark.parametrize("damage", CORRUPTIONS, ids=list(CORRUPTIONS))
def test_a_corrupt_session_is_never_used_and_is_rebuilt_over(make_store, damage):
    where, change, error, message, history_kept, version = CORRUPTIONS[damage]

    async def scenario():
        store, session = make_store(chunk_bytes=64), IDS.new("acme")
        await store.save("acme", session, 0, state(1), [1, 2, 3], FINGERPRINT)
        keys = SessionKeys("acme", session)
        if where.startswith("chunk"):
            (chunk_key,) = [key for key in await session_keys(store, "acme", session)
                            if key.endswith(":" + where[6:].replace(" ", ":")) and ":chunk:" in key]
            key = chunk_key
        else:
            key = getattr(keys, where)
        await rewrite(store, key, change)
        with pytest.raises(error, match=message) as lost:
            await store.load("acme", session, FINGERPRINT)
        assert isinstance(lost.value, SessionLost)
        assert (lost.value.history is not None) == history_kept and lost.value.version == version
        if history_kept:
            assert lost.value.history.tolist() == [1, 2, 3]
        assert await store.save("acme", session, lost.value.version, state(2), [1, 2, 3], FINGERPRINT) == version + 1
        assert_state((await store.load("acme", session, FINGERPRINT)).tensors, state(2))
        await store.close()

    run(scenario())


def test_the_memory_store_is_the_default_without_a_url(redis_server):
    assert isinstance(open_store(None, timeout_seconds=1), MemoryStore)
    assert isinstance(open_store(redis_server.url, ttl_seconds=5, timeout_seconds=1), RedisStore)
    with pytest.raises(KilnError, match="must start with"):
        open_store("http://127.0.0.1:1")
    with pytest.raises(KilnError, match=r"http://user:\*\*\*@") as error:
        open_store("http://user:secret@127.0.0.1:1")
    assert "secret" not in str(error.value)


def test_redis_stopped_mid_session_is_unavailable_then_resumes_empty(own_redis_server):
    async def scenario():
        store, session = RedisStore(own_redis_server.url, timeout_seconds=1), IDS.new("acme")
        await store.save("acme", session, 0, state(1), [1, 2], FINGERPRINT)
        loaded = await store.load("acme", session, FINGERPRINT)
        own_redis_server.stop()
        for call in (store.load("acme", session, FINGERPRINT),
                     store.save("acme", session, loaded.version, state(2), [1, 2, 3], FINGERPRINT),
                     store.touch("acme", session), store.delete("acme", session)):
            with pytest.raises(StoreUnavailable, match=r"redis://127\.0\.0\.1"):
                await asyncio.wait_for(call, 10)  # fails, and promptly: nothing hangs
        own_redis_server.start()  # the same port, empty: nothing was persisted
        with pytest.raises(SessionNotFound):
            await store.load("acme", session, FINGERPRINT)
        assert await store.save("acme", session, 0, state(3), [1, 2], FINGERPRINT) == 1
        assert_state((await store.load("acme", session, FINGERPRINT)).tensors, state(3))
        await store.close()

    run(scenario())


def test_a_redis_that_stops_answering_times_out(own_redis_server):
    async def scenario():
        store, session = RedisStore(own_redis_server.url, timeout_seconds=0.5), IDS.new("acme")
        await store.save("acme", session, 0, state(1), [1], FINGERPRINT)
        own_redis_server.freeze()
        try:
            with pytest.raises(StoreUnavailable, match="Timeout"):
                await asyncio.wait_for(store.load("acme", session, FINGERPRINT), 10)
        finally:
            own_redis_server.thaw()
        assert_state((await store.load("acme", session, FINGERPRINT)).tensors, state(1))
        await store.close()

    run(scenario())


def test_a_redis_out_of_memory_stores_nothing_of_a_save(own_redis_server):
    """Some chunks are refused (maxmemory, noeviction): the manifest is not advanced to point at them."""

    async def scenario():
        store, session = RedisStore(own_redis_server.url, chunk_bytes=1 << 20), IDS.new("acme")
        await store.save("acme", session, 0, state(1), [1], FINGERPRINT)
        client = own_redis_server.client()
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", client.info("memory")["used_memory"] + (2 << 20))
        try:
            with pytest.raises(StoreUnavailable, match="did not store"):
                await store.save("acme", session, 1, {"k": np.ones(8 << 20, np.uint8)}, [1, 2], FINGERPRINT)
        finally:
            client.config_set("maxmemory", 0)
        loaded = await store.load("acme", session, FINGERPRINT)
        assert loaded.version == 1 and loaded.history.tolist() == [1]
        assert_state(loaded.tensors, state(1))
        await store.close()

    run(scenario())


def test_only_commands_redis_7_and_valkey_share_are_used(redis_server):
    """A user allowed exactly those commands (Lua's own calls are checked too) runs everything."""
    allowed = "+get +set +exists +del +unlink +pexpire +evalsha +script|load +ping"
    redis_server.client().execute_command("ACL", "SETUSER", "kiln-test", "reset", "on", ">secret", "~*",
                                          *allowed.split())
    url = redis_server.url.replace("redis://", "redis://kiln-test:secret@")
    import redis

    with pytest.raises(redis.exceptions.NoPermissionError):  # the limit holds
        redis.Redis.from_url(url).execute_command("KEYS", "*")

    async def scenario():
        from runtime.sessions.prediction_cache import PredictionCache

        store, session = RedisStore(url), IDS.new("acme")
        await store.save("acme", session, 0, state(1), [1], FINGERPRINT)
        await store.save("acme", session, 1, state(2), [1, 2], FINGERPRINT)
        with pytest.raises(SessionConflict):
            await store.save("acme", session, 1, state(3), [1, 2], FINGERPRINT)
        assert_state((await store.load("acme", session, FINGERPRINT)).tensors, state(2))
        assert await store.touch("acme", session) and await store.delete("acme", session)
        cache = PredictionCache(store, ttl_seconds=10)
        assert await cache.put("acme", FINGERPRINT, "serving_default", {"x": np.ones(3)}, {"y": np.zeros(2)})
        assert (await cache.get("acme", FINGERPRINT, "serving_default", {"x": np.ones(3)}))["y"].tolist() == [0, 0]
        await store.close()

    run(scenario())
    redis_server.client().execute_command("SCRIPT", "FLUSH")  # the next EVALSHA must load it again
    run(scenario())


ROUNDS = 4


def race_writer(url: str, session: str, writer: int, barrier, results) -> None:
    """One of two processes: every round, load the current version with the other, then both save."""

    async def main():
        store = RedisStore(url, chunk_bytes=256 << 10)
        for round_ in range(ROUNDS):
            barrier.wait()
            version = (await store.load("acme", session, FINGERPRINT)).version
            barrier.wait()
            tensors = {"k": np.full(1 << 19, 10 * round_ + writer, np.float32),
                       "v": np.full(1 << 19, -(10 * round_ + writer), np.float32)}
            try:
                results.put((round_, writer, await store.save("acme", session, version, tensors, [round_, writer],
                                                              FINGERPRINT)))
            except SessionConflict:
                results.put((round_, writer, "conflict"))
        await store.close()

    asyncio.run(main())


def test_two_writer_processes_race_and_exactly_one_wins_each_round(redis_server):
    session = IDS.new("acme")

    async def first():
        store = RedisStore(redis_server.url)
        await store.save("acme", session, 0, {"k": np.zeros(1, np.float32)}, [], FINGERPRINT)
        await store.close()

    run(first())
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    writers = [context.Process(target=race_writer, args=(redis_server.url, session, i, barrier, results))
               for i in range(2)]
    for process in writers:
        process.start()
    outcomes = [results.get(timeout=120) for _ in range(2 * ROUNDS)]
    for process in writers:
        process.join(30)
        assert process.exitcode == 0
    last = None
    for round_ in range(ROUNDS):
        this_round = sorted((writer, result) for r, writer, result in outcomes if r == round_)
        winners = [writer for writer, result in this_round if result == round_ + 2]
        assert len(winners) == 1 and [result for _, result in this_round].count("conflict") == 1, this_round
        last = 10 * round_ + winners[0]

    async def check():
        store = RedisStore(redis_server.url)
        loaded = await store.load("acme", session, FINGERPRINT)
        assert loaded.version == ROUNDS + 1 and loaded.history.tolist() == [ROUNDS - 1, last % 10]
        assert set(np.unique(loaded.tensors["k"])) == {last} and set(np.unique(loaded.tensors["v"])) == {-last}
        assert len(await session_keys(store, "acme", session)) == 2 + 2 * (1 + 8)  # nothing of the losers left
        await store.close()

    run(check())
