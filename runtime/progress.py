"""Progress bars for long commands, on tqdm: `kiln score` (bytes of input read, inputs done, rows)
and `kiln compile` (`steps`: signatures and buckets compiled, runtime objects built).

A bar draws only on a terminal (a log, a pipe or CI gets the commands' own lines instead). Lines
printed while a bar is up go through tqdm.write (`message`, `say`) and log records through tqdm's
logging_redirect_tqdm (`logging_around_bars`), so neither overwrites the bar nor is overwritten.
"""

from __future__ import annotations

import sys
import time
from contextlib import AbstractContextManager
from typing import Any, TextIO

REDRAW_SECONDS = 0.1


class ProgressBar:
    """`kiln score`'s bar: the share of input bytes read, inputs done, rows and rows per second."""

    def __init__(
        self, total_bytes: int, total_items: int, *, stream: TextIO | None = None, enabled: bool | None = None
    ):
        from tqdm import tqdm

        self.stream = stream or sys.stderr
        self.enabled = _is_terminal(self.stream) if enabled is None else enabled
        self.total_bytes, self.total_items = max(total_bytes, 0), total_items
        self.bytes = self.rows = self.items = 0
        self.started = time.monotonic()
        self._bar = tqdm(
            total=self.total_bytes or None,
            unit="B",
            unit_scale=True,
            file=self.stream,
            disable=not self.enabled,
            mininterval=REDRAW_SECONDS,
            dynamic_ncols=True,
        )
        self._bar.set_postfix_str(self._postfix(), refresh=False)

    def advance(self, rows: int = 0, size: int = 0) -> None:
        self.rows += rows
        self.bytes += size
        self._bar.set_postfix_str(self._postfix(), refresh=False)
        self._bar.update(size)

    def item_done(self) -> None:
        self.items += 1
        self._bar.set_postfix_str(self._postfix())

    def message(self, text: str, stream: TextIO | None = None) -> None:
        """A line above the bar (or just the line, without a bar), on the bar's stream or another
        (such as standard output, when both are the terminal)."""
        say(text, stream or self.stream)

    def close(self) -> None:
        self._bar.close()

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.rows / elapsed if elapsed > 0 else 0.0

    def line(self, width: int) -> str:
        """The bar as text, at most width characters (tqdm's own format)."""
        from tqdm import tqdm

        return tqdm.format_meter(
            self.bytes,
            self.total_bytes or None,
            time.monotonic() - self.started,
            ncols=width,
            unit="B",
            unit_scale=True,
            postfix=self._postfix(),
        )

    def _postfix(self) -> str:
        return f"{self.items}/{self.total_items} inputs {self.rows:,} rows {self.rate:,.0f} rows/s"


def steps(total: int, description: str, unit: str = "step") -> Any:
    """A bar over `total` steps on standard error (drawn on a terminal only); a tqdm to update()."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=description,
        unit=unit,
        file=sys.stderr,
        disable=not _is_terminal(sys.stderr),
        mininterval=REDRAW_SECONDS,
        dynamic_ncols=True,
        leave=False,
    )


def say(text: str, stream: TextIO | None = None) -> None:
    """Print a line without breaking a bar that is up."""
    from tqdm import tqdm

    tqdm.write(text, file=stream or sys.stderr)


def logging_around_bars() -> AbstractContextManager:
    """While it is entered, the root logger's console output goes around the bars."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
