"""Splitting a batch of any size into the servable's compiled batch sizes (buckets)."""

from __future__ import annotations


def plan_chunks(rows: int, buckets: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(start, stop, bucket) chunks covering rows: full largest buckets, then the smallest bucket
    that holds the rest, so at most one chunk carries padding."""
    largest = buckets[-1]
    chunks = []
    start = 0
    while rows - start > largest:
        chunks.append((start, start + largest, largest))
        start += largest
    if rows > start:
        rest = rows - start
        chunks.append((start, rows, next(b for b in buckets if b >= rest)))
    return chunks
