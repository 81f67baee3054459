"""Which redis-py client a session store URL gets: one server's (`Redis`) or a cluster's (`RedisCluster`).

ElastiCache and Memorystore in cluster mode, and Valkey or Redis clusters, are reached through one
endpoint (ElastiCache's configuration endpoint, Memorystore's discovery endpoint, or any node) that
users write as a plain `redis://` or `rediss://` URL. So the first time the store is used Kiln asks
that server whether it is a cluster node (`INFO cluster`: `cluster_enabled:1`) and, if it is, opens
redis-py's cluster client there: it reads the slot map from that node and sends each command, script
and pipeline to the shard that holds its keys (following MOVED and ASK when slots move). Every key of
a session carries one hash tag (runtime.sessions.keys), so each of the store's pipelines and its
compare-and-set script touch one slot, on one shard, in one round trip. `redis+cluster://` and
`rediss+cluster://` name a cluster outright and skip the question (so an ACL user on a cluster
needs `info` allowed, or that scheme; on a single server INFO is not needed: refused, it means one).
A cluster has only database 0.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoPermissionError

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


async def connect(url: str, **options: Any) -> aioredis.Redis | RedisCluster:
    """The client for `url` (its scheme already checked), with redis-py connection `options`."""
    scheme, _, rest = url.partition("://")
    if scheme in CLUSTER_SCHEMES:
        return await _cluster(f"{CLUSTER_SCHEMES[scheme]}://{rest}", options)
    client = aioredis.Redis.from_url(url, **options)
    if scheme == "unix":
        return client
    try:
        if not (await client.info("cluster")).get("cluster_enabled"):
            return client
    except NoPermissionError:  # an ACL without INFO, which a single server needs no more than that
        return client
    await client.aclose()
    return await _cluster(url, options)


async def _cluster(url: str, options: dict[str, Any]) -> RedisCluster:
    client = RedisCluster.from_url(url, **options)
    await client.initialize()  # the slot map, now: a wrong endpoint fails here, not on a later call
    return client
