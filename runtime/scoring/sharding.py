"""Cloud Run Jobs' shares of the inputs: each task scores the items whose hash falls to it."""

from __future__ import annotations

import hashlib

from runtime.errors import ConfigError


def shard(items: list[str], index: int, count: int) -> list[str]:
    """Task `index` of `count`'s share of items (Cloud Run Jobs: CLOUD_RUN_TASK_INDEX and
    CLOUD_RUN_TASK_COUNT), in the items' order. An item's task depends on the item alone (a hash of
    it), so tasks that listed an input prefix at slightly different moments still agree on every
    item both saw: each is scored by exactly one task."""
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"task index {index} of {count} tasks: expected 0 <= index < count and count >= 1")
    return [item for item in items if _bucket_of(item, count) == index]


def _bucket_of(item: str, count: int) -> int:
    return int.from_bytes(hashlib.sha256(item.encode("utf-8", "surrogatepass")).digest()[:8], "big") % count
