"""The prediction cache, in process and in a real redis-server: a hit only for the same tenant,
servable fingerprint, signature and input bytes, dtypes, shapes and names; corrupt entries and an
unreachable store are misses, never answers or failures."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from runtime.errors import ConfigError
from runtime.sessions import MemoryStore, RedisStore
from runtime.sessions.encoding import pack
from runtime.sessions.memory import MemoryBackend
from runtime.sessions.prediction_cache import PredictionCache

INPUTS = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "mask": np.array([True, False])}
OUTPUTS = {"y": np.array([[0.25], [0.75]], np.float32), "label": np.array([3, 1], np.int64)}
CALL = ("acme", "agent/1/abc", "serving_default")
run = asyncio.run
pytest_plugins = ["tests.redis_server"]  # its fixtures: redis_server, own_redis_server


@pytest.fixture(params=["memory", "redis"])
def make_cache(request):
    if request.param == "memory":
        return lambda **options: PredictionCache(MemoryStore(), **options)
    url = request.getfixturevalue("redis_server").url
    return lambda **options: PredictionCache(RedisStore(url), **options)


def test_a_hit_returns_exactly_what_was_put(make_cache):
    async def scenario():
        cache = make_cache(ttl_seconds=30)
        assert await cache.get(*CALL, INPUTS) is None
        assert await cache.put(*CALL, INPUTS, OUTPUTS)
        hit = await cache.get(*CALL, {"mask": INPUTS["mask"].copy(), "x": INPUTS["x"].copy()})
        assert hit.keys() == OUTPUTS.keys()
        for name, array in OUTPUTS.items():
            assert hit[name].dtype == array.dtype and hit[name].tolist() == array.tolist()

    run(scenario())


def variations():
    x = INPUTS["x"]
    yield "tenant", ("globex", *CALL[1:]), INPUTS
    yield "servable version", (CALL[0], "agent/2/def", CALL[2]), INPUTS
    yield "signature", (*CALL[:2], "other"), INPUTS
    yield "one value", CALL, {**INPUTS, "x": np.where(x == 5, 5.5, x).astype(np.float32)}
    yield "dtype, same bytes", CALL, {**INPUTS, "x": x.view(np.int32)}
    yield "shape, same bytes", CALL, {**INPUTS, "x": x.reshape(3, 2)}
    yield "input name", CALL, {"x2": x, "mask": INPUTS["mask"]}
    yield "an input fewer", CALL, {"x": x}


@pytest.mark.parametrize("call, inputs", [v[1:] for v in variations()], ids=[v[0] for v in variations()])
def test_nothing_but_the_same_call_hits(make_cache, call, inputs):
    async def scenario():
        cache = make_cache(ttl_seconds=30)
        await cache.put(*CALL, INPUTS, OUTPUTS)
        assert await cache.get(*call, inputs) is None
        assert cache.key(*call, inputs) != cache.key(*CALL, INPUTS)

    run(scenario())


def test_entries_expire(make_cache):
    async def scenario():
        cache = make_cache(ttl_seconds=0.2)
        await cache.put(*CALL, INPUTS, OUTPUTS)
        await asyncio.sleep(0.4)
        assert await cache.get(*CALL, INPUTS) is None

    run(scenario())


def test_large_empty_or_text_tensors_are_not_cached(make_cache):
    async def scenario():
        cache = make_cache(ttl_seconds=30, max_entry_bytes=64)
        assert not await cache.put(*CALL, INPUTS, {"y": np.zeros(100)})
        assert not await cache.put(*CALL, INPUTS, {})
        assert not await cache.put(*CALL, INPUTS, {"y": np.array(["text"])})
        assert await cache.get(*CALL, INPUTS) is None
        text = {"x": np.array([b"bytes"], dtype=object)}
        assert not await cache.put(*CALL, text, OUTPUTS)
        assert await cache.get(*CALL, text) is None

    run(scenario())


def test_a_corrupt_entry_is_a_miss_and_is_removed(make_cache):
    async def scenario():
        cache = make_cache(ttl_seconds=30)
        await cache.put(*CALL, INPUTS, OUTPUTS)
        key = cache.key(*CALL, INPUTS)
        (value,) = await cache.backend.get([key])
        broken = bytearray(value)
        broken[-1] ^= 1
        await cache.backend.put([(key, bytes(broken))], 30_000)
        assert await cache.get(*CALL, INPUTS) is None
        assert await cache.backend.get([key]) == [None]

    run(scenario())


def test_an_entry_of_another_servable_under_this_key_is_a_miss():
    """What a (practically impossible) digest collision would bring: the fingerprint check refuses it."""

    async def scenario():
        cache = PredictionCache(MemoryStore(), ttl_seconds=30)
        await cache.backend.put([(cache.key(*CALL, INPUTS), pack("y", OUTPUTS["y"], "agent/9/zzz"))], 30_000)
        assert await cache.get(*CALL, INPUTS) is None

    run(scenario())


def test_an_unreachable_store_is_a_miss_not_a_failure(own_redis_server, caplog):
    async def scenario():
        cache = PredictionCache(RedisStore(own_redis_server.url, timeout_seconds=0.5), ttl_seconds=30)
        await cache.put(*CALL, INPUTS, OUTPUTS)
        own_redis_server.stop()
        assert await cache.get(*CALL, INPUTS) is None
        assert await cache.put(*CALL, INPUTS, OUTPUTS) is False

    run(scenario())
    assert "prediction cache" in caplog.text


def test_the_time_to_live_is_required():
    with pytest.raises(ConfigError, match="positive"):
        PredictionCache(MemoryStore(), ttl_seconds=0)
    assert isinstance(PredictionCache(MemoryStore(), ttl_seconds=1).backend, MemoryBackend)
