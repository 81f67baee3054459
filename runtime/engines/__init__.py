"""Engines run a servable's signatures on numpy arrays; open_servable picks them by manifest."""

from __future__ import annotations

from pathlib import Path

from runtime.engines.base import Engine


def open_servable(directory: str | Path, *, verify: bool = True, threads: int | None = None) -> Engine:
    """Load the servable in `directory` after checking its manifest, files and target CPU."""
    return Engine.open(Path(directory), verify=verify, threads=threads)
