"""A progress bar on a terminal for long commands (`kiln score`), with no dependency.

On a terminal it redraws one line (at most ten times a second): the share of the input bytes read,
inputs done, rows and rows per second, and the time left. Where the stream is not a terminal (a
log, a pipe, CI) it draws nothing; the command prints its own summary line instead.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

REDRAW_SECONDS = 0.1


class ProgressBar:
    def __init__(self, total_bytes: int, total_items: int, *, stream: TextIO | None = None,
                 enabled: bool | None = None):
        self.stream = stream or sys.stderr
        self.enabled = _is_terminal(self.stream) if enabled is None else enabled
        self.total_bytes, self.total_items = max(total_bytes, 0), total_items
        self.bytes = self.rows = self.items = 0
        self.started = time.monotonic()
        self._drawn = 0.0

    def advance(self, rows: int = 0, size: int = 0) -> None:
        self.rows += rows
        self.bytes += size
        self._draw()

    def item_done(self) -> None:
        self.items += 1
        self._draw(force=True)

    def message(self, text: str, stream: TextIO | None = None) -> None:
        """A line above the bar (or just the line, without a bar), on the bar's stream or another
        (such as standard output, when both are the terminal)."""
        if self.enabled:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        out = stream or self.stream
        out.write(text + "\n")
        out.flush()
        self._draw(force=True)

    def close(self) -> None:
        if self.enabled:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.rows / elapsed if elapsed > 0 else 0.0

    def line(self, width: int) -> str:
        """The bar as text, at most width characters."""
        share = min(1.0, self.bytes / self.total_bytes) if self.total_bytes else (
            self.items / self.total_items if self.total_items else 1.0)
        elapsed = time.monotonic() - self.started
        left = elapsed * (1 - share) / share if share > 0 else None
        tail = (f" {share:4.0%} {self.items}/{self.total_items} inputs {self.rows:,} rows "
                f"{self.rate:,.0f} rows/s {_clock(elapsed)}<{_clock(left)}")
        room = width - len(tail) - 2
        if room < 10:
            return tail.strip()[:width]
        filled = int(room * share)
        return f"[{'#' * filled}{'.' * (room - filled)}]{tail}"

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._drawn < REDRAW_SECONDS:
            return
        self._drawn = now
        width = shutil.get_terminal_size((80, 24)).columns - 1
        self.stream.write("\r" + self.line(width))
        self.stream.flush()


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
