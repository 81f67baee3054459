"""Sessions in a real Redis Cluster (three redis-server primaries on loopback, made with `redis-cli
--cluster create`), reached as ElastiCache's or Memorystore's cluster endpoint is given: a plain
redis:// URL to one node. The behavioural suite also runs against it (tests/test_sessions_store.py's
make_store); here: sessions spread over every shard, each pipeline and script the store sends touches
one slot, and a session saved by one process is resumed by another."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import numpy as np
from redis.asyncio.cluster import RedisCluster

from runtime.sessions import RedisStore, SessionIds, servable_fingerprint
from tests.conftest import run_python

pytest_plugins = ["tests.redis_server"]  # redis_cluster, redis_server
FINGERPRINT = servable_fingerprint("agent", 1, b'{"name": "agent"}')
IDS = SessionIds([b"c" * 32])
run = asyncio.run


def record_pipelines(client: RedisCluster) -> list[list[tuple]]:
    """Every pipeline the client makes from now on, as the commands queued on it."""
    pipelines: list[list[tuple]] = []
    make = client.pipeline

    def pipeline(*args, **kwargs):
        pipe, commands = make(*args, **kwargs), []
        queue = pipe.execute_command

        def execute_command(*command, **options):
            commands.append(command)
            return queue(*command, **options)

        pipe.execute_command = execute_command
        pipelines.append(commands)
        return pipe

    client.pipeline = pipeline
    return pipelines


def keys_of(command: tuple) -> list:
    name = command[0].upper()
    if name in ("EVALSHA", "EVAL"):
        return list(command[3:3 + int(command[2])])
    return [command[1]]


def test_sessions_spread_over_every_shard_and_each_pipeline_touches_one_slot(redis_cluster):
    async def scenario():
        store = RedisStore(redis_cluster.url, chunk_bytes=256)  # several chunks per state
        client = await store.backend.connected()
        assert isinstance(client, RedisCluster)  # found out from the plain URL
        pipelines = record_pipelines(client)
        sessions = [IDS.new("acme") for _ in range(24)]
        for index, session in enumerate(sessions):
            tensors = {"h": np.full((1, 64), index, np.float32)}
            assert await store.save("acme", session, 0, tensors, [index], FINGERPRINT) == 1
            loaded = await store.load("acme", session, FINGERPRINT)
            assert await store.save("acme", session, loaded.version, {"h": loaded.tensors["h"] + 1}, [index, 1],
                                    FINGERPRINT) == 2
        for index, session in enumerate(sessions):
            loaded = await store.load("acme", session, FINGERPRINT)
            assert loaded.version == 2 and loaded.tensors["h"].tolist() == [[index + 1.0] * 64]
        assert await store.touch("acme", sessions[0]) and await store.delete("acme", sessions[0])
        await store.close()
        return pipelines

    pipelines = run(scenario())
    assert any(command[0] == "EVALSHA" for commands in pipelines for command in commands)
    from redis.crc import key_slot

    for commands in pipelines:
        slots = {key_slot(key.encode() if isinstance(key, str) else key) for c in commands for key in keys_of(c)}
        assert len(slots) == 1, commands

    # Every shard holds sessions, and each session lives on one shard.
    shard_of = defaultdict(set)
    for index, node in enumerate(redis_cluster.nodes):
        keys = node.client().keys("kiln:{acme:*")
        assert keys, f"shard {index} holds no session"
        for key in keys:
            shard_of[key.split(b"}")[0]].add(index)
    assert len(shard_of) == 23 and all(len(shards) == 1 for shards in shard_of.values())


SAVE = """
import asyncio, sys
import numpy as np
from runtime.sessions import RedisStore, SessionIds, servable_fingerprint
url, session, expected, value = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
fingerprint = servable_fingerprint("agent", 1, b'{"name": "agent"}')

async def main():
    store = RedisStore(url)
    history = []
    if expected:
        loaded = await store.load("acme", session, fingerprint)
        assert loaded.version == expected, loaded.version
        history = list(loaded.history)
        value_before = float(loaded.tensors["h"][0, 0])
        print("resumed", value_before)
    version = await store.save("acme", session, expected, {"h": np.full((1, 8), value, np.float32)},
                               history + [int(value)], fingerprint)
    print("saved", version)
    await store.close()

asyncio.run(main())
"""


def test_a_session_is_resumed_by_another_process(redis_cluster):
    url = redis_cluster.url.replace("redis://", "redis+cluster://")  # named outright, as well
    session = IDS.new("acme")
    first = run_python(SAVE, url, session, "0", "3")
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == ["saved", "1"]
    second = run_python(SAVE, url, session, "1", "4")
    assert second.returncode == 0, second.stderr
    assert second.stdout.split() == ["resumed", "3.0", "saved", "2"]

    async def check():
        store = RedisStore(redis_cluster.url)
        loaded = await store.load("acme", session, FINGERPRINT)
        await store.close()
        return loaded

    loaded = run(check())
    assert loaded.version == 2 and loaded.tensors["h"].tolist() == [[4.0] * 8] and list(loaded.history) == [3, 4]


def test_a_single_server_gets_the_plain_client(redis_server):
    async def scenario():
        store = RedisStore(redis_server.url)
        client = await store.backend.connected()
        await store.close()
        return client

    assert not isinstance(run(scenario()), RedisCluster)
