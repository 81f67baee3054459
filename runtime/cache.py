"""Where Kiln caches slow builds (AOT runtime objects, example servables): KILN_CACHE_DIR, else
~/.cache/kiln. Entries are keyed by everything they are built from, so a stale one is never used."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("KILN_CACHE_DIR") or Path.home() / ".cache" / "kiln")
