"""The local cache of servables downloaded from a model store, verified once, evicted LRU by size.

Layout: ROOT/STORE/NAME/VERSION, STORE a hash of the store's URL. A version is downloaded into a
hidden staging directory beside its final place, its files FILES_AT_ONCE at a time (each in byte
ranges fetched concurrently), each checked against its manifest by the size and sha256 computed as
its bytes arrived (no second pass), and renamed into place whole: a directory under its final
name is always complete and verified, so the engine may open it with verify=False. Versions are
immutable, as in TensorFlow Serving: a cached version is never downloaded again.

A version whose runtime library is shared (format 3) and not installed here brings it from the store's
.kiln/runtime/ once per store, into the same place under the store's copy (runtime/runtime_library.py).

A local store (a directory on this machine) is not copied: fetch returns the store's own directory,
unverified, and the engine checks it when it opens it, as it would without a cache. A copy would
double the disk used and the start-up time for nothing.

Eviction is by whole versions, least recently fetched first, and makes room before a download, so
that a full disk (Lambda's /tmp) does not fail it. A fetched version is pinned until the caller
releases it, once per fetch, when it unloads the version; pinned versions are never evicted, even
if that leaves the cache above its limit. Processes sharing one cache root (the workers of `kiln
serve`) download safely side by side and respect each other's pins: a process holds a shared flock
on .ROOT.pins/STORE/NAME/VERSION (beside the root: the cache itself holds only versions) while it
fetches or pins the version, and eviction takes it exclusively, without waiting, or passes the
version by.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from runtime.errors import ConfigError, ServableError, StorageError
from runtime.manifest import MANIFEST_FILE, Manifest, check_file, read_manifest
from runtime.storage import FILES_AT_ONCE, KeyNotFound, LocalStorage, Storage, key_parts

ROOT_ENV = "KILN_SERVABLE_CACHE"
BYTES_ENV = "KILN_SERVABLE_CACHE_BYTES"
DEFAULT_ROOT = Path("/tmp/kiln-servables")  # Lambda's only writable disk is /tmp
DEFAULT_BYTES = 8 << 30

T = TypeVar("T")


class NotPublished(StorageError):
    """A version directory without manifest.json: its publisher has not finished writing it yet."""


@dataclass(frozen=True)
class FetchedServable:
    """A servable on local disk. verified: its files were checked against its manifest when they
    were written into the cache, so the engine need not hash them again (open with verify=False)."""

    directory: Path
    verified: bool


@dataclass
class _Flight:
    """One fetch in progress, shared by every caller that asked for the same version meanwhile."""

    result: Future[FetchedServable] = field(default_factory=Future)
    callers: int = 1


class ServableCache:
    def __init__(self, root: Path | None = None, max_bytes: int | None = None):
        self.root = root or Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)
        self.max_bytes = default_max_bytes() if max_bytes is None else max_bytes
        self._lock = threading.Lock()
        self._flights: dict[tuple[str, str, int], _Flight] = {}
        self._pins: Counter[Path] = Counter()
        self._shared: dict[Path, int] = {}  # pinned directory -> the descriptor of its shared flock

    def fetch(self, storage: Storage, name: str, version: int) -> FetchedServable:
        """The servable NAME/VERSION of the store on local disk, pinned until release(directory).

        Raises NotPublished where the version has no manifest.json yet, ServableError where its
        files do not match its manifest (and leaves nothing in the cache), StorageError where the
        store cannot be read.
        """
        if key_parts(name) != [name]:
            raise ValueError(f"invalid model name {name!r}: it must be one path component")
        key = (storage.url, name, version)
        with self._lock:
            known = self._flights.get(key)
            leading = known is None
            if known is None:
                flight = self._flights[key] = _Flight()
            else:
                flight = known
                flight.callers += 1
        if leading:
            held = None if isinstance(storage, LocalStorage) else self._hold(self._place(storage.url, name, version))
            try:
                fetched = self._fetch(storage, name, version)
            except BaseException as e:
                with self._lock:
                    del self._flights[key]
                if held is not None:
                    os.close(held)
                flight.result.set_exception(e)
            else:
                with self._lock:  # pinned before it stops counting as in flight: never evictable
                    del self._flights[key]
                    self._pins[fetched.directory] += flight.callers
                    if held is not None and self._shared.setdefault(fetched.directory, held) != held:
                        os.close(held)  # this process holds it already
                flight.result.set_result(fetched)
        return flight.result.result()

    def release(self, directory: Path) -> None:
        """Undo one fetch's pin: once no fetch holds the version, it may be evicted."""
        with self._lock:
            if not self._pins.get(directory):
                raise ValueError(f"{directory} is not pinned in the servable cache")
            self._pins[directory] -= 1
            if not self._pins[directory]:
                del self._pins[directory]
                if directory in self._shared:
                    os.close(self._shared.pop(directory))

    def _place(self, url: str, name: str, version: int) -> Path:
        """Where the cache keeps NAME/VERSION of the store at url."""
        return self.root / hashlib.sha256(url.encode()).hexdigest()[:16] / name / str(version)

    def _fetch(self, storage: Storage, name: str, version: int) -> FetchedServable:
        prefix = f"{name}/{version}"
        if isinstance(storage, LocalStorage):
            directory = storage.path(prefix)
            if not (directory / MANIFEST_FILE).is_file():
                raise NotPublished(f"{directory} is not published yet: it has no {MANIFEST_FILE}")
            return FetchedServable(directory, verified=False)
        final = self._place(storage.url, name, version)
        if (final / MANIFEST_FILE).is_file():  # in flight, so no eviction can take it meanwhile
            _touch(final)
            return FetchedServable(final, verified=True)
        try:
            raw = storage.read_bytes(f"{prefix}/{MANIFEST_FILE}")
        except KeyNotFound:
            raise NotPublished(f"{storage.url}/{prefix} is not published yet: it has no {MANIFEST_FILE}") from None
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = final.with_name(f".{final.name}.partial-{uuid.uuid4().hex[:8]}")
        staging.mkdir()
        try:
            (staging / MANIFEST_FILE).write_bytes(raw)  # visible only with the whole directory
            manifest = _checked(storage, prefix, lambda: read_manifest(staging))
            self._make_room(len(raw) + sum(entry.size for entry in manifest.files.values()))
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-fetch-runtime") as alongside:
                runtime = alongside.submit(self._fetch_runtime, storage, manifest, final.parent.parent)
                self._download_files(storage, prefix, manifest, staging)
                runtime.result()
            _touch(staging)
            try:
                staging.rename(final)
            except OSError:  # another process put it there first
                if not (final / MANIFEST_FILE).is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return FetchedServable(final, verified=True)

    @staticmethod
    def _download_files(storage: Storage, prefix: str, manifest: Manifest, staging: Path) -> None:
        """Download every file, FILES_AT_ONCE at a time, largest first, each checked against the
        manifest by the size and sha256 computed while it arrived (no second pass over the bytes)."""
        targets = {}
        for relative in manifest.files:
            try:
                targets[relative] = staging.joinpath(*key_parts(relative))
            except ValueError:
                raise ServableError(
                    f"{storage.url}/{prefix}: its manifest lists file {relative!r}, outside the servable's directory"
                ) from None
            targets[relative].parent.mkdir(parents=True, exist_ok=True)

        def download(relative: str) -> None:
            try:
                received = storage.download(f"{prefix}/{relative}", targets[relative], manifest.files[relative].size)
            except KeyNotFound:
                raise ServableError(
                    f"{storage.url}/{prefix}: file {relative} is listed in its manifest but missing from the store"
                ) from None
            check_file(
                f"{storage.url}/{prefix}",
                relative,
                manifest.files[relative],
                size=received.size,
                sha256=received.sha256,
            )

        order = sorted(manifest.files, key=lambda name: -manifest.files[name].size)
        pool = ThreadPoolExecutor(max_workers=FILES_AT_ONCE, thread_name_prefix="kiln-fetch")
        try:
            for done in [pool.submit(download, relative) for relative in order]:
                done.result()
        finally:  # after a failure, files not started are not fetched; those under way finish first
            pool.shutdown(wait=True, cancel_futures=True)

    def _fetch_runtime(self, storage: Storage, manifest: Manifest, base: Path) -> None:
        """A shared runtime that is not installed here, fetched once per store from its .kiln/runtime/
        into the same place under the store's copy (runtime/runtime_library.py), checked as it arrives.
        Several versions and processes may fetch it at once: each writes it whole or not at all."""
        from runtime import runtime_library

        runtime = manifest.runtime
        if runtime is None or runtime.embedded or runtime_library.installed(runtime):
            return
        target = runtime_library.store_copy(base, runtime)
        if target.is_file() and target.stat().st_size == runtime.size:
            return  # checked when it arrived; the engine checks it again before loading it
        target.parent.mkdir(parents=True, exist_ok=True)
        key = runtime_library.store_key(runtime)
        try:
            received = storage.download(key, target, runtime.size)
        except KeyNotFound:
            places = ", ".join(map(str, runtime_library.installed_dirs()))
            raise ServableError(
                f"{storage.url}/{manifest.name}/{manifest.version} needs the Kiln runtime library "
                f"{runtime.key}, which is neither installed here (looked in {places}) nor in its "
                f"store ({storage.url}/{key}): upload BASE/{key} from where it was compiled, or "
                f"recompile with --embed-runtime"
            ) from None
        if (received.size, received.sha256) != (runtime.size, runtime.sha256):
            target.unlink(missing_ok=True)
            raise ServableError(
                f"{storage.url}/{key} has {received.size} bytes and sha256 {received.sha256}; "
                f"{manifest.name} version {manifest.version} expects {runtime.size} bytes and "
                f"sha256 {runtime.sha256} (runtime {runtime.key})"
            )

    def _hold(self, directory: Path, exclusive: bool = False) -> int | None:
        return _flock(_lock_file(self.root, directory), exclusive)

    def _make_room(self, needed: int) -> None:
        """Evict least recently used versions, never pinned or in-flight ones, until `needed`
        more bytes fit under max_bytes. Victims leave their place by a rename under the lock, so
        no fetch sees one half deleted."""
        victims = []
        with self._lock:
            held = set(self._pins) | {self._place(*key) for key in self._flights}
            entries = sorted(self._entries())
            total = sum(size for _, _, size in entries)
            for _, directory, size in entries:
                if total + needed <= self.max_bytes:
                    break
                if directory in held:
                    continue
                lock = self._hold(directory, exclusive=True)
                if lock is None:  # another process holds it
                    continue
                try:
                    victim = directory.with_name(f".{directory.name}.evicted-{uuid.uuid4().hex[:8]}")
                    directory.rename(victim)
                finally:
                    os.close(lock)
                victims.append(victim)
                total -= size
        for victim in victims:
            shutil.rmtree(victim, ignore_errors=True)

    def _entries(self) -> list[tuple[int, Path, int]]:
        """(last use, directory, bytes) of every cached version."""
        entries = []
        for directory in self.root.glob("*/*/*"):
            if any(part.startswith(".") for part in directory.relative_to(self.root).parts):
                continue  # staging, evicted, or a store's shared runtime (never evicted: small, shared)
            try:
                used = directory.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            size = sum(
                os.path.getsize(os.path.join(parent, name)) for parent, _, names in os.walk(directory) for name in names
            )
            entries.append((used, directory, size))
        return entries


def default_max_bytes() -> int:
    raw = os.environ.get(BYTES_ENV)
    if not raw:
        return DEFAULT_BYTES
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{BYTES_ENV} must be a number of bytes, got {raw!r}") from None


def _checked(storage: Storage, prefix: str, check: Callable[[], T]) -> T:
    """check(), its ServableError naming the store's servable rather than the staging directory."""
    try:
        return check()
    except ServableError as e:
        raise ServableError(f"{storage.url}/{prefix} failed its checks after download: {e}") from None


def _lock_file(root: Path, directory: Path) -> Path:
    """Where the flock of the cached version at `directory` lives: .ROOT.pins/STORE/NAME/VERSION."""
    path = root.with_name(f".{root.name}.pins") / directory.relative_to(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _flock(path: Path, exclusive: bool) -> int | None:
    """A descriptor holding the flock of `path`, shared (waiting for an eviction under way) or
    exclusive (None at once if any process holds it); closing it lets go."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _touch(directory: Path) -> None:
    """Mark a version as used now: its mtime orders eviction (nanoseconds, unlike the file clock)."""
    now = time.time_ns()
    os.utime(directory, ns=(now, now))
