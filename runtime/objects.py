"""What every store shares, whichever kind it is (runtime.storage's local and S3 stores,
runtime.gcs_storage's Cloud Storage): an object's identity, how long to retry, keys as paths, and
downloads written into place while hashed."""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from runtime.errors import StorageError


class ObjectChanged(StorageError):
    """An object was replaced while it was being read: what was read is not one version of it."""


@dataclass(frozen=True)
class ObjectInfo:
    """A stored object's size and identity: a string that changes whenever its contents may have
    (S3: its ETag and version id; local: modification time in nanoseconds and size)."""

    size: int
    identity: str


@dataclass(frozen=True)
class Retry:
    """How long to keep trying a store that fails transiently (unreachable, timing out, 5xx,
    throttling): at most `attempts` tries, waiting `delay` seconds doubled after each failure
    (with jitter, at most `max_delay`), and never starting a wait that would end past `deadline`
    seconds since the first try. A function's start-up cannot wait for a store forever."""

    attempts: int = 5
    delay: float = 0.2
    max_delay: float = 5.0
    deadline: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"Retry.attempts must be at least 1, got {self.attempts}")


@dataclass(frozen=True)
class Received:
    """What a download wrote: its size and sha256, computed as the bytes arrived."""

    size: int
    sha256: str


class _Hashing(io.RawIOBase):
    """A write-only file that hashes what passes into it. Being unseekable, boto3's transfer manager
    writes the byte ranges it fetches concurrently in order, so a file is hashed as it arrives
    rather than read back in a second pass."""

    def __init__(self, out: BinaryIO):
        self.out, self.digest, self.size = out, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, data) -> int:
        self.digest.update(data)
        self.out.write(data)
        self.size += len(data)
        return len(data)

    def received(self) -> Received:
        return Received(self.size, self.digest.hexdigest())


def key_parts(key: str) -> list[str]:
    """The path components of a key, refusing any that would leave the store's root."""
    parts = key.strip("/").split("/") if key.strip("/") else []
    if key.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"invalid storage key {key!r}: it must be a relative path without '.' or '..'")
    return parts


def write_into_place(dest: Path, write: Callable[[io.RawIOBase], object]) -> Received:
    """Write dest through a temporary file beside it, renamed over dest only once complete; returns
    the size and sha256 of what was written."""
    temporary = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(temporary, "xb") as out:
            hashing = _Hashing(out)
            write(hashing)
        temporary.replace(dest)
        return hashing.received()
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
