"""gs:// stores through google-cloud-storage, with Application Default Credentials: the service
account a Cloud Run service, job or function runs as (or `gcloud auth application-default login`,
or GOOGLE_APPLICATION_CREDENTIALS), as TF Serving's own gs:// reads them. No key to keep anywhere.

The client (the `gcp` extra) is imported when the first gs:// store is opened, and shared by every
store of the process. STORAGE_EMULATOR_HOST points it at an emulator (the client's own variable).
Reads of an object pin its generation, so a reader streams one version (ObjectChanged when that
version is replaced under it); a write is one upload, which GCS makes visible whole or not at all.
Failures the client's retry policy takes (429, 5xx, dropped connections) are retried with its
exponential backoff within the store's Retry deadline, then reported as StorageError.
The S3-interoperable path with an HMAC key stays available: runtime.storage picks it when
KILN_GCS_ENDPOINT_URL is set.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from runtime.errors import KeyNotFound, StorageError
from runtime.objects import ObjectChanged, ObjectInfo, Received, Retry, key_parts, write_into_place

T = TypeVar("T")
_client: Any = None
_client_key: str | None = None
_client_lock = threading.Lock()


def _shared_client() -> Any:
    """One client per process (it holds the credentials and a connection pool); a new one if the
    emulator variable changed."""
    global _client, _client_key
    key = os.environ.get("STORAGE_EMULATOR_HOST", "")
    with _client_lock:
        if _client is None or _client_key != key:
            from google.cloud import storage

            _client, _client_key = storage.Client(), key
        return _client


class GcsStorage:
    """A Cloud Storage bucket (and optional prefix)."""

    def __init__(self, bucket: str, prefix: str = "", retry: Retry = Retry()):
        from google.cloud.storage.retry import DEFAULT_RETRY

        self.prefix = prefix
        self.retry = retry
        self._policy = DEFAULT_RETRY.with_timeout(retry.deadline).with_delay(
            initial=retry.delay, maximum=retry.max_delay
        )
        try:
            self._bucket = _shared_client().bucket(bucket)
        except Exception as e:  # noqa: BLE001 -- no credentials found, most likely
            raise StorageError(f"cannot open gs://{bucket}: {type(e).__name__}: {e}") from None

    @property
    def url(self) -> str:
        root = f"gs://{self._bucket.name}"
        return f"{root}/{self.prefix}" if self.prefix else root

    def list_children(self, prefix: str = "") -> list[str]:
        start = self._directory(prefix)

        def listing() -> list[str]:
            pages = self._bucket.client.list_blobs(self._bucket, prefix=start, delimiter="/", retry=self._policy)
            for _ in pages:  # the prefixes fill in as the pages are read
                pass
            return sorted(common[len(start) :].rstrip("/") for common in pages.prefixes)

        return self._call(f"listing {self._name(prefix)}", listing)

    def exists(self, key: str) -> bool:
        return self._call(f"looking up {self._name(key)}", lambda: self._blob(key).exists(retry=self._policy))

    def read_bytes(self, key: str) -> bytes:
        return self._call(f"reading {self._name(key)}", lambda: self._blob(key).download_as_bytes(retry=self._policy))

    def download(self, key: str, dest: Path, size: int | None = None) -> Received:
        return self._call(
            f"downloading {self._name(key)}",
            lambda: write_into_place(dest, lambda out: self._blob(key).download_to_file(out, retry=self._policy)),
        )

    def list_keys(self, prefix: str = "") -> list[str]:
        root, start = self._directory(""), self._directory(prefix)

        def listing() -> list[str]:
            blobs = self._bucket.client.list_blobs(self._bucket, prefix=start, retry=self._policy)
            return sorted(blob.name[len(root) :] for blob in blobs if not blob.name.endswith("/"))

        return self._call(f"listing {self._name(prefix)}", listing)

    def stat(self, key: str) -> ObjectInfo:
        return _info(self._current(key))

    def reader(self, key: str) -> tuple[ObjectInfo, BinaryIO]:
        blob = self._current(key)
        pinned = self._bucket.blob(blob.name, generation=blob.generation)
        what = f"reading {self._name(key)}"
        stream = self._call(what, lambda: pinned.open("rb", retry=self._policy))
        return _info(blob), io.BufferedReader(_OneVersion(self, what, stream), 1 << 20)

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call(f"writing {self._name(key)}", lambda: self._blob(key).upload_from_string(data, retry=self._policy))

    def delete(self, key: str) -> None:
        try:
            self._call(f"deleting {self._name(key)}", lambda: self._blob(key).delete(retry=self._policy))
        except KeyNotFound:
            pass

    def _current(self, key: str) -> Any:
        blob = self._call(
            f"looking up {self._name(key)}", lambda: self._bucket.get_blob(self._object_key(key), retry=self._policy)
        )
        if blob is None:
            raise KeyNotFound(f"looking up {self._name(key)}: no such key")
        return blob

    def _object_key(self, key: str) -> str:
        return "/".join([*key_parts(self.prefix), *key_parts(key)])

    def _directory(self, prefix: str) -> str:
        start = self._object_key(prefix)
        return f"{start}/" if start else ""

    def _blob(self, key: str) -> Any:
        return self._bucket.blob(self._object_key(key))

    def _name(self, key: str) -> str:
        return f"{self.url}/{key}" if key else self.url

    def _call(self, what: str, call: Callable[[], T], missing: type[StorageError] = KeyNotFound) -> T:
        """call(), its failures phrased: missing (`missing`; ObjectChanged for a pinned generation),
        replaced, refused, or still failing after the client's retries."""
        from google.api_core import exceptions
        from google.auth.exceptions import GoogleAuthError

        try:
            return call()
        except exceptions.NotFound:
            raise missing(
                f"{what}: "
                + ("no such key" if missing is KeyNotFound else "the object was replaced while it was being read")
            ) from None
        except exceptions.PreconditionFailed:
            raise ObjectChanged(f"{what}: the object was replaced while it was being read") from None
        except (exceptions.GoogleAPICallError, exceptions.RetryError, GoogleAuthError, OSError) as e:
            raise StorageError(f"{what} failed: {type(e).__name__}: {e}") from None
        except Exception as e:  # requests' own errors past the retry deadline
            if type(e).__module__.startswith(("requests", "urllib3", "google")):
                raise StorageError(f"{what} failed: {type(e).__name__}: {e}") from None
            raise


class _OneVersion(io.RawIOBase):
    """A pinned generation's bytes: that generation gone (replaced, in a bucket without versioning)
    mid-read is ObjectChanged, not a missing key."""

    def __init__(self, storage: GcsStorage, what: str, stream: BinaryIO):
        self.storage, self.what, self.stream = storage, what, stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.storage._call(self.what, lambda: self.stream.read(len(buffer)), missing=ObjectChanged)
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self.stream.close()
        super().close()


def _info(blob: Any) -> ObjectInfo:
    return ObjectInfo(blob.size or 0, f"generation={blob.generation}")
