"""The scoring job's chunks in flight, finished in input order and gathered into parts."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field


@dataclass
class Part:
    index: int
    rows: int = 0
    errors: int = 0
    lines: list[bytes] = field(default_factory=list)


class Pipeline:
    """Chunks in flight, at most `limit`, finished in input order: each chunk's lines join its
    part, and a part is written (one write at a time) once all of its chunks are done."""

    def __init__(self, limit: int, write: Callable[[Part], Coroutine]):
        self.limit, self.write = limit, write
        self.window: deque[tuple[Part, asyncio.Task | None]] = deque()  # None: the part is complete
        self.running = 0
        self.writing: asyncio.Task | None = None

    async def add(self, part: Part, work: Coroutine) -> None:
        self.window.append((part, asyncio.create_task(work)))
        self.running += 1
        await self._drain(self.limit - 1)

    def finish(self, part: Part) -> None:
        self.window.append((part, None))

    async def close(self) -> None:
        await self._drain(0)
        if self.writing is not None:
            await self.writing

    def cancel(self) -> None:
        for _, task in self.window:
            if task is not None:
                task.cancel()
        if self.writing is not None:
            self.writing.cancel()

    async def _drain(self, keep: int) -> None:
        """Finish chunks until at most `keep` run, and start writing every complete part in front."""
        while self.window and (self.running > keep or self.window[0][1] is None):
            part, task = self.window.popleft()
            if task is None:
                if self.writing is not None:
                    await self.writing
                self.writing = asyncio.create_task(self.write(part))
                continue
            lines, errors = await task
            self.running -= 1
            part.lines.extend(lines)
            part.errors += errors
