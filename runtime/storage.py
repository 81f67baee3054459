"""Model stores, chosen by URL: a local directory or an S3-compatible bucket, behind one surface.

The repository discovers NAME/VERSION by listing "subdirectories", and the servable cache reads a
version's manifest and downloads its files; neither needs to know which kind of store it reads.
Batch scoring (runtime.scoring) also lists objects under a prefix, streams them with their
identity, and writes results: every write is atomic (a reader sees the old object or the whole new
one, never a part), on S3 because a PUT is, on a local disk by a temporary file renamed into place.
Keys are '/'-separated paths relative to the store's root.

S3 goes through boto3, imported only when an s3:// store is opened. Any S3-compatible store works
through boto3's own settings: AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL) for the endpoint, and
credentials from boto3's usual chain (environment, profile, instance or function role).
gs://BUCKET URLs are Google Cloud Storage through google-cloud-storage with Application Default
Credentials (runtime.gcs_storage); with KILN_GCS_ENDPOINT_URL set (https://storage.googleapis.com),
through its S3-interoperable XML API instead, with boto3 and an HMAC key in boto3's chain
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY).
"""

from __future__ import annotations

import io
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar
from urllib.parse import unquote, urlparse

from runtime.errors import ConfigError, KeyNotFound, StorageError
from runtime.objects import ObjectChanged, ObjectInfo, Received, Retry, key_parts, write_into_place

SCHEMES = "a local path, file://PATH, s3://BUCKET[/PREFIX] or gs://BUCKET[/PREFIX]"
# Failures that say nothing about the request itself: the next attempt may well succeed.
TRANSIENT_CODES = {
    "Throttling",
    "ThrottlingException",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
}
MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
CHANGED_CODES = {"PreconditionFailed", "412"}

T = TypeVar("T")
# Downloads: byte ranges of CHUNK_BYTES (boto3's default), RANGES_AT_ONCE of them per file in flight,
# and the client's connection pool sized for FILES_AT_ONCE such files (runtime/servable_cache.py).
# 4 and 4 fetched MobileNetV2 from moto on loopback (2 cores) at 0.88x boto3's unhashed download_file,
# 8 and 8 at 0.84x, before small files skipped the HEAD (load/download_throughput.py).
CHUNK_BYTES = 8 << 20
RANGES_AT_ONCE = 4
FILES_AT_ONCE = 4


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

    def download(self, key: str, dest: Path, size: int | None = None) -> Received:
        """Copy a file, however large, to dest, hashing it on the way; a partial copy never appears
        under dest's name. `size`, where the caller knows it (a manifest), spares the store a
        lookup; the caller still checks what arrived."""

    def list_keys(self, prefix: str = "") -> list[str]:
        """Sorted keys of every file under the "directory" prefix, at any depth; [] where none."""

    def stat(self, key: str) -> ObjectInfo:
        """The file's size and identity; KeyNotFound where there is none."""

    def reader(self, key: str) -> tuple[ObjectInfo, BinaryIO]:
        """A file's identity and a stream of its bytes, read as they are needed; the stream is one
        version of the file (ObjectChanged if it is replaced while read) and the caller closes it."""

    def write_bytes(self, key: str, data: bytes) -> None:
        """Store data at key, atomically: readers see the old file or all of the new one."""

    def delete(self, key: str) -> None:
        """Remove the file at key, if there is one."""


def open_storage(url: str, *, retry: Retry = Retry()) -> Storage:
    """The store at url: a local path or file:// URL, s3://bucket[/prefix] or gs://bucket[/prefix]."""
    parsed = urlparse(url)
    if parsed.scheme == "" or (parsed.scheme == "file" and parsed.netloc in ("", "localhost")):
        path = unquote(parsed.path) if parsed.scheme else url
        if not path:
            raise ConfigError(f"model store URL {url!r} names no directory; use {SCHEMES}")
        return LocalStorage(Path(path))
    if parsed.scheme in ("s3", "gs") and parsed.netloc:
        try:
            prefix = "/".join(key_parts(parsed.path.strip("/")))
        except ValueError as e:
            raise ConfigError(f"model store URL {url!r} has an invalid prefix: {e}") from None
        if parsed.scheme == "gs" and os.environ.get("KILN_GCS_ENDPOINT_URL"):  # an HMAC key, S3's API
            return S3Storage(
                parsed.netloc, prefix, retry, scheme="gs", endpoint_url=os.environ["KILN_GCS_ENDPOINT_URL"]
            )
        if parsed.scheme == "gs":
            from runtime.gcs_storage import GcsStorage

            return GcsStorage(parsed.netloc, prefix, retry)
        return S3Storage(parsed.netloc, prefix, retry)
    raise ConfigError(f"model store URL {url!r} is not supported; use {SCHEMES}")


def split_location(location: str) -> tuple[str, str]:
    """A location (a path, file://, s3:// or gs:// URL) as the store holding it and its name there:
    BASE/NAME as (BASE, NAME). A model's base path, a config file's location, an object to score."""
    trimmed = location.rstrip("/")
    parent, _, name = trimmed.rpartition("/")
    if trimmed.startswith("/") and not parent:
        parent = "/"
    if not name or not parent or parent.endswith(":/"):
        raise ConfigError(f"{location!r} must name a directory or file inside a store")
    return parent, name


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

    def download(self, key: str, dest: Path, size: int | None = None) -> Received:
        source = self.path(key)
        try:
            with open(source, "rb") as f:
                return write_into_place(dest, lambda out: shutil.copyfileobj(f, out, 1 << 20))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyNotFound(f"{source} does not exist") from None

    def list_keys(self, prefix: str = "") -> list[str]:
        top = self.path(prefix)
        keys: list[str] = []
        errors: list[OSError] = []
        for directory, subdirectories, files in os.walk(top, onerror=errors.append):
            subdirectories.sort()
            relative = Path(directory).relative_to(self.root).as_posix()
            keys.extend(name if relative == "." else f"{relative}/{name}" for name in files)
        if errors and not isinstance(errors[0], (FileNotFoundError, NotADirectoryError)):
            raise StorageError(f"cannot list {top}: {errors[0].strerror}")
        return sorted(keys)

    def stat(self, key: str) -> ObjectInfo:
        path = self.path(key)
        try:
            return _local_info(os.stat(path), path)
        except (FileNotFoundError, NotADirectoryError):
            raise KeyNotFound(f"{path} does not exist") from None
        except OSError as e:
            raise StorageError(f"cannot look up {path}: {e.strerror}") from None

    def reader(self, key: str) -> tuple[ObjectInfo, BinaryIO]:
        path = self.path(key)
        try:
            stream = open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyNotFound(f"{path} does not exist") from None
        except OSError as e:
            raise StorageError(f"cannot read {path}: {e.strerror}") from None
        try:
            return _local_info(os.fstat(stream.fileno()), path), stream
        except BaseException:
            stream.close()
            raise

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self.path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_into_place(path, lambda out: out.write(data))
        except OSError as e:
            raise StorageError(f"cannot write {path}: {e.strerror}") from None

    def delete(self, key: str) -> None:
        path = self.path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            raise StorageError(f"cannot delete {path}: {e.strerror}") from None


class S3Storage:
    """A bucket (and optional key prefix) of S3 or any S3-compatible store, through boto3.

    boto3's own retries are turned off so that one policy, `Retry`, bounds every call, with a
    delay that tests can shorten; large files go through boto3's transfer manager, which fetches
    byte ranges of `chunk_bytes` in parallel (RANGES_AT_ONCE per file), retried whole if one fails.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        retry: Retry = Retry(),
        *,
        scheme: str = "s3",
        endpoint_url: str | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ):
        from boto3.s3.transfer import TransferConfig

        self.bucket, self.prefix, self.retry, self.scheme = bucket, prefix, retry, scheme
        self._client = _s3_client(endpoint_url)
        self._transfer = TransferConfig(
            multipart_threshold=chunk_bytes,
            multipart_chunksize=chunk_bytes,
            max_concurrency=RANGES_AT_ONCE,
            io_chunksize=1 << 20,
        )

    @property
    def url(self) -> str:
        root = f"{self.scheme}://{self.bucket}"
        return f"{root}/{self.prefix}" if self.prefix else root

    def _object_key(self, key: str) -> str:
        return "/".join([*key_parts(self.prefix), *key_parts(key)])

    def list_children(self, prefix: str = "") -> list[str]:
        start = self._object_key(prefix)
        start = f"{start}/" if start else ""

        def listing() -> list[str]:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=start, Delimiter="/"
            )
            return sorted(
                common["Prefix"][len(start) :].rstrip("/")
                for page in pages
                for common in page.get("CommonPrefixes", [])
            )

        return self._call(f"listing {self._name(prefix)}", listing)

    def exists(self, key: str) -> bool:
        try:
            self._call(
                f"looking up {self._name(key)}",
                lambda: self._client.head_object(Bucket=self.bucket, Key=self._object_key(key)),
            )
        except KeyNotFound:
            return False
        return True

    def read_bytes(self, key: str) -> bytes:
        def read() -> bytes:
            return self._client.get_object(Bucket=self.bucket, Key=self._object_key(key))["Body"].read()

        return self._call(f"reading {self._name(key)}", read)

    def download(self, key: str, dest: Path, size: int | None = None) -> Received:
        def fetch() -> Received:
            if size is not None and size < self._transfer.multipart_threshold:
                return write_into_place(dest, lambda out: self._copy_object(key, out, size))
            return write_into_place(
                dest,
                lambda out: self._client.download_fileobj(
                    self.bucket, self._object_key(key), out, Config=self._transfer
                ),
            )

        return self._call(f"downloading {self._name(key)}", fetch)

    def _copy_object(self, key: str, out: io.RawIOBase, size: int) -> None:
        """A small file in one GET: the transfer manager would first ask the store its size (a HEAD
        per file, most of a small file's time on a fast network). Reading stops past `size`: an
        object larger than its manifest says is refused by the caller without filling the disk."""
        body = self._client.get_object(Bucket=self.bucket, Key=self._object_key(key))["Body"]
        written = 0
        try:
            for chunk in body.iter_chunks(64 << 10):
                written += out.write(chunk)
                if written > size:
                    break
        finally:
            body.close()

    def list_keys(self, prefix: str = "") -> list[str]:
        root = self._object_key("")
        start = self._object_key(prefix)
        start = f"{start}/" if start else ""

        def listing() -> list[str]:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start)
            skip = len(root) + 1 if root else 0
            return sorted(
                item["Key"][skip:]
                for page in pages
                for item in page.get("Contents", [])
                if not item["Key"].endswith("/")
            )  # "folder" placeholders hold nothing

        return self._call(f"listing {self._name(prefix)}", listing)

    def stat(self, key: str) -> ObjectInfo:
        head = self._call(
            f"looking up {self._name(key)}",
            lambda: self._client.head_object(Bucket=self.bucket, Key=self._object_key(key)),
        )
        return _s3_info(head)

    def reader(self, key: str) -> tuple[ObjectInfo, BinaryIO]:
        response = self._call(
            f"reading {self._name(key)}", lambda: self._client.get_object(Bucket=self.bucket, Key=self._object_key(key))
        )
        info = _s3_info(response)
        return info, io.BufferedReader(_S3Stream(self, key, response, info), 1 << 20)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call(
            f"writing {self._name(key)}",
            lambda: self._client.put_object(Bucket=self.bucket, Key=self._object_key(key), Body=data),
        )

    def delete(self, key: str) -> None:
        self._call(
            f"deleting {self._name(key)}",
            lambda: self._client.delete_object(Bucket=self.bucket, Key=self._object_key(key)),
        )

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
        raise StorageError(
            f"{what} failed after {attempt} attempt(s) in {time.monotonic() - started:.1f} s; last error: {cause}"
        )

    def _transient_cause(self, error: Exception, what: str) -> str:
        """The phrased cause of a failure worth retrying; raises at once for any other."""
        from boto3.exceptions import RetriesExceededError
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            HTTPClientError,
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
        )
        from s3transfer.exceptions import RetriesExceededError as TransferRetriesExceeded

        if isinstance(error, ClientError):
            info = error.response.get("Error", {})
            code = str(info.get("Code", ""))
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            cause = f"{code} (HTTP {status}) {info.get('Message', '')}".strip()
            if code in MISSING_CODES:
                raise KeyNotFound(f"{what}: no such key") from None
            if code in CHANGED_CODES:
                raise ObjectChanged(f"{what}: the object was replaced while it was being read") from None
            if status >= 500 or status == 429 or code in TRANSIENT_CODES:
                return cause
            raise StorageError(f"{what} failed: the store refused it: {cause}") from None
        if isinstance(
            error,
            (
                ConnectionError,
                HTTPClientError,
                IncompleteReadError,
                ReadTimeoutError,
                ResponseStreamingError,
                RetriesExceededError,
                TransferRetriesExceeded,
            ),
        ):
            return str(error)
        if isinstance(error, BotoCoreError):  # no credentials, bad parameters: retrying cannot help
            raise StorageError(f"{what} failed: {error}") from None
        raise error


# Making a boto3 client reads its service description (tens of milliseconds): stores opened with the
# same settings share one (boto3 clients are safe to share between threads). A store opened after
# one of these variables changed gets a new client.
CLIENT_ENVIRONMENT = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)
_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()
MAX_CLIENTS = 16


def _s3_client(endpoint_url: str | None):
    key = (endpoint_url, *(os.environ.get(name) for name in CLIENT_ENVIRONMENT))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(
                retries={"mode": "standard", "total_max_attempts": 1},
                connect_timeout=5,
                read_timeout=30,
                max_pool_connections=FILES_AT_ONCE * RANGES_AT_ONCE,
            )
            client = boto3.session.Session().client("s3", config=config, endpoint_url=endpoint_url)
            if len(_clients) >= MAX_CLIENTS:
                del _clients[next(iter(_clients))]
            _clients[key] = client
        return client


class _S3Stream(io.RawIOBase):
    """An S3 object's body, read as needed. A read that fails transiently (a reset connection, a
    timeout, a body cut short) reopens the object where it stopped, for the same version only
    (If-Match its ETag), under the store's retry policy."""

    def __init__(self, storage: S3Storage, key: str, response: dict, info: ObjectInfo):
        self.storage, self.key, self.info = storage, key, info
        self.etag = response.get("ETag")
        self.body = response["Body"]
        self.offset = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.offset >= self.info.size:
            return 0
        data = self.storage._call(f"reading {self.storage._name(self.key)}", lambda: self._read(len(buffer)))
        buffer[: len(data)] = data
        self.offset += len(data)
        return len(data)

    def _read(self, size: int) -> bytes:
        """Up to size bytes; after a failure the next attempt reopens the body at the offset."""
        from botocore.exceptions import IncompleteReadError

        try:
            if self.body is None:
                self.body = self.storage._client.get_object(
                    Bucket=self.storage.bucket,
                    Key=self.storage._object_key(self.key),
                    Range=f"bytes={self.offset}-",
                    **({"IfMatch": self.etag} if self.etag else {}),
                )["Body"]
            data = self.body.read(size)
            if not data:
                raise IncompleteReadError(actual_bytes=self.offset, expected_bytes=self.info.size)
            return data
        except Exception:
            if self.body is not None:
                self.body.close()
                self.body = None
            raise

    def close(self) -> None:
        if not self.closed and self.body is not None:
            self.body.close()
        super().close()


def _s3_info(response: dict) -> ObjectInfo:
    identity = f"etag={response.get('ETag', '')}"
    if response.get("VersionId") not in (None, "null"):
        identity += f";version={response['VersionId']}"
    return ObjectInfo(response.get("ContentLength", 0), identity)


def _local_info(status: os.stat_result, path: Path) -> ObjectInfo:
    import stat

    if not stat.S_ISREG(status.st_mode):
        raise KeyNotFound(f"{path} is not a file")
    return ObjectInfo(status.st_size, f"mtime_ns={status.st_mtime_ns};size={status.st_size}")
