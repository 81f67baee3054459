"""Model stores, chosen by URL: a local directory or an S3-compatible bucket, behind one surface.

The repository discovers NAME/VERSION by listing "subdirectories", and the servable cache reads a
version's manifest and downloads its files; neither needs to know which kind of store it reads.
Keys are '/'-separated paths relative to the store's root.

S3 goes through boto3, imported only when an s3:// store is opened. Any S3-compatible store works
through boto3's own settings: AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL) for the endpoint, and
credentials from boto3's usual chain (environment, profile, instance or function role).
"""

from __future__ import annotations

import os
import random
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar
from urllib.parse import unquote, urlparse

from runtime.errors import ConfigError, StorageError

SCHEMES = "a local path, file://PATH or s3://BUCKET[/PREFIX]"
# Failures that say nothing about the request itself: the next attempt may well succeed.
TRANSIENT_CODES = {"Throttling", "ThrottlingException", "SlowDown", "RequestTimeout",
                   "RequestTimeoutException", "InternalError", "ServiceUnavailable"}
MISSING_CODES = {"NoSuchKey", "404", "NotFound"}

T = TypeVar("T")


class KeyNotFound(StorageError):
    """The store answered, and it holds nothing at this key."""


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


class Storage(Protocol):
    @property
    def url(self) -> str:
        """The store's root URL (s3://bucket/prefix, file:///path); names it in messages and caches."""

    def list_children(self, prefix: str = "") -> list[str]:
        """Sorted names of the "subdirectories" right under prefix; [] where there are none."""

    def exists(self, key: str) -> bool:
        """Whether the store holds a file at key."""

    def read_bytes(self, key: str) -> bytes:
        """A small file's contents, such as a manifest.json."""

    def download(self, key: str, dest: Path) -> None:
        """Copy a file, however large, to dest; a partial copy never appears under dest's name."""


def open_storage(url: str, *, retry: Retry = Retry()) -> Storage:
    """The store at url: a local path or file:// URL, or s3://bucket[/prefix]."""
    parsed = urlparse(url)
    if parsed.scheme == "" or (parsed.scheme == "file" and parsed.netloc in ("", "localhost")):
        path = unquote(parsed.path) if parsed.scheme else url
        if not path:
            raise ConfigError(f"model store URL {url!r} names no directory; use {SCHEMES}")
        return LocalStorage(Path(path))
    if parsed.scheme == "s3" and parsed.netloc:
        try:
            prefix = "/".join(key_parts(parsed.path.strip("/")))
        except ValueError as e:
            raise ConfigError(f"model store URL {url!r} has an invalid prefix: {e}") from None
        return S3Storage(parsed.netloc, prefix, retry)
    raise ConfigError(f"model store URL {url!r} is not supported; use {SCHEMES}")


def key_parts(key: str) -> list[str]:
    """The path components of a key, refusing any that would leave the store's root."""
    parts = key.strip("/").split("/") if key.strip("/") else []
    if key.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"invalid storage key {key!r}: it must be a relative path without '.' or '..'")
    return parts


class LocalStorage:
    """A directory on this machine, such as a mounted volume or a repository built in place."""

    def __init__(self, root: Path):
        self.root = root.absolute()

    @property
    def url(self) -> str:
        return self.root.as_uri()

    def path(self, key: str) -> Path:
        return self.root.joinpath(*key_parts(key))

    def list_children(self, prefix: str = "") -> list[str]:
        try:
            return sorted(entry.name for entry in os.scandir(self.path(prefix)) if entry.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            raise StorageError(f"cannot list {self.path(prefix)}: {e.strerror}") from None

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def read_bytes(self, key: str) -> bytes:
        path = self.path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyNotFound(f"{path} does not exist") from None
        except OSError as e:
            raise StorageError(f"cannot read {path}: {e.strerror}") from None

    def download(self, key: str, dest: Path) -> None:
        source = self.path(key)
        try:
            with open(source, "rb") as f:
                _write_into_place(dest, lambda out: shutil.copyfileobj(f, out, 1 << 20))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyNotFound(f"{source} does not exist") from None


class S3Storage:
    """A bucket (and optional key prefix) of S3 or any S3-compatible store, through boto3.

    boto3's own retries are turned off so that one policy, `Retry`, bounds every call, with a
    delay that tests can shorten; large files go through boto3's transfer manager, which fetches
    byte ranges in parallel.
    """

    def __init__(self, bucket: str, prefix: str = "", retry: Retry = Retry()):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket, self.prefix, self.retry = bucket, prefix, retry
        config = Config(retries={"mode": "standard", "total_max_attempts": 1},
                        connect_timeout=5, read_timeout=30)
        self._client = boto3.session.Session().client("s3", config=config)
        self._transfer = TransferConfig()

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _object_key(self, key: str) -> str:
        return "/".join([*key_parts(self.prefix), *key_parts(key)])

    def list_children(self, prefix: str = "") -> list[str]:
        start = self._object_key(prefix)
        start = f"{start}/" if start else ""

        def listing() -> list[str]:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=start, Delimiter="/")
            return sorted(common["Prefix"][len(start):].rstrip("/")
                          for page in pages for common in page.get("CommonPrefixes", []))

        return self._call(f"listing {self._name(prefix)}", listing)

    def exists(self, key: str) -> bool:
        try:
            self._call(f"looking up {self._name(key)}",
                       lambda: self._client.head_object(Bucket=self.bucket, Key=self._object_key(key)))
        except KeyNotFound:
            return False
        return True

    def read_bytes(self, key: str) -> bytes:
        def read() -> bytes:
            return self._client.get_object(Bucket=self.bucket, Key=self._object_key(key))["Body"].read()

        return self._call(f"reading {self._name(key)}", read)

    def download(self, key: str, dest: Path) -> None:
        def fetch() -> None:
            _write_into_place(dest, lambda out: self._client.download_fileobj(
                self.bucket, self._object_key(key), out, Config=self._transfer))

        self._call(f"downloading {self._name(key)}", fetch)

    def _name(self, key: str) -> str:
        return f"{self.url}/{key}" if key else self.url

    def _call(self, what: str, call: Callable[[], T]) -> T:
        """call(), retried per self.retry while it fails transiently; a phrased StorageError after."""
        started = time.monotonic()
        for attempt in range(1, self.retry.attempts + 1):
            try:
                return call()
            except Exception as e:  # noqa: BLE001 -- sorted into missing, permanent and transient
                cause = self._transient_cause(e, what)
            elapsed = time.monotonic() - started
            wait = min(self.retry.max_delay, self.retry.delay * 2 ** (attempt - 1)) * random.uniform(0.5, 1)
            if attempt == self.retry.attempts or elapsed + wait > self.retry.deadline:
                break
            time.sleep(wait)
        raise StorageError(f"{what} failed after {attempt} attempt(s) in {time.monotonic() - started:.1f} s; "
                           f"last error: {cause}")

    def _transient_cause(self, error: Exception, what: str) -> str:
        """The phrased cause of a failure worth retrying; raises at once for any other."""
        from boto3.exceptions import RetriesExceededError
        from botocore.exceptions import (BotoCoreError, ClientError, ConnectionError, HTTPClientError,
                                         IncompleteReadError)
        from s3transfer.exceptions import RetriesExceededError as TransferRetriesExceeded

        if isinstance(error, ClientError):
            info = error.response.get("Error", {})
            code = str(info.get("Code", ""))
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            cause = f"{code} (HTTP {status}) {info.get('Message', '')}".strip()
            if code in MISSING_CODES:
                raise KeyNotFound(f"{what}: no such key") from None
            if status >= 500 or status == 429 or code in TRANSIENT_CODES:
                return cause
            raise StorageError(f"{what} failed: the store refused it: {cause}") from None
        if isinstance(error, (ConnectionError, HTTPClientError, IncompleteReadError, RetriesExceededError,
                              TransferRetriesExceeded)):
            return str(error)
        if isinstance(error, BotoCoreError):  # no credentials, bad parameters: retrying cannot help
            raise StorageError(f"{what} failed: {error}") from None
        raise error


def _write_into_place(dest: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write dest through a temporary file beside it, renamed over dest only once complete."""
    temporary = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(temporary, "xb") as out:
            write(out)
        temporary.replace(dest)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
