"""Model stores by URL and the servable cache, against moto's S3-compatible server on loopback:
listing, fetching with verification, broken and unpublished uploads, an unreachable store,
eviction by size, and concurrent fetches sharing one download."""

from __future__ import annotations

import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import orjson
import pytest

from runtime.engines import open_servable
from runtime.errors import ConfigError, ServableError, StorageError
from runtime.manifest import Manifest, Signature, Target, TensorSpec, describe_files, read_manifest
from runtime.servable_cache import FetchedServable, NotPublished, ServableCache
from runtime.storage import KeyNotFound, LocalStorage, Retry, S3Storage, open_storage
from tests.conftest import run_python

FAST = Retry(attempts=3, delay=0.01, max_delay=0.05, deadline=5)


def fake_servable(directory: Path, name: str = "tiny", version: int = 1, size: int = 64 << 10) -> Path:
    """A small servable with a valid manifest: enough for storage, not for an engine."""
    rng = np.random.default_rng(version)
    (directory / "lib").mkdir(parents=True)
    (directory / "lib" / "model.so").write_bytes(rng.bytes(size))
    (directory / "weights.bin").write_bytes(rng.bytes(size // 4))
    spec = TensorSpec(name="x", dtype="float32", shape=(None, 4))
    Manifest(name=name, version=version, engine="saved-model",
             signatures={"serving_default": Signature(engine="saved-model", inputs=(spec,), outputs=(spec,))},
             batch_sizes=(1,), target=Target(triple="x86_64-pc-linux", cpu="generic", features=()),
             tensorflow_version="2.21.0", files=describe_files(directory)).write(directory)
    return directory


def upload(client, bucket: str, source: Path, prefix: str) -> None:
    for path in sorted(source.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(source)}")


def gcs_upload(bucket, source: Path, prefix: str) -> None:
    """Every file under source, manifest.json files last (publication)."""
    for path in sorted(source.rglob("*"), key=lambda p: (p.name == "manifest.json", str(p))):
        if path.is_file():
            bucket.blob(f"{prefix}/{path.relative_to(source).as_posix()}").upload_from_filename(str(path))


@pytest.fixture
def local_repository(tmp_path) -> Path:
    """A local repository: tiny/1 and tiny/2 published, tiny/3 still being written."""
    root = tmp_path / "models"
    fake_servable(root / "tiny" / "1", version=1)
    fake_servable(root / "tiny" / "2", version=2)
    (root / "tiny" / "3" / "lib").mkdir(parents=True)
    return root


@pytest.fixture(params=["path", "file", "s3", "gcs"])
def store(request, local_repository):
    """The same local_repository, behind each kind of URL."""
    if request.param == "path":
        return open_storage(str(local_repository))
    if request.param == "file":
        return open_storage(local_repository.as_uri())
    if request.param == "gcs":  # gs:// with google-cloud-storage, against its emulator
        client, name = request.getfixturevalue("gcs_bucket")
        gcs_upload(client.bucket(name), local_repository, "models")
        client.bucket(name).blob("models/tiny/3/lib/partial.so").upload_from_string(b"\0")
        return open_storage(f"gs://{name}/models", retry=FAST)
    client, name = request.getfixturevalue("bucket")
    upload(client, name, local_repository, "models")
    client.put_object(Bucket=name, Key="models/tiny/3/lib/partial.so", Body=b"\0")
    return open_storage(f"s3://{name}/models", retry=FAST)


@pytest.fixture
def s3_repository(bucket, local_repository):
    """The local_repository uploaded to S3: (client, bucket name, storage)."""
    client, name = bucket
    upload(client, name, local_repository, "models")
    return client, name, open_storage(f"s3://{name}/models", retry=FAST)


def cached_entries(cache: ServableCache) -> list[str]:
    """Everything under the cache root, staging and evicted directories included."""
    return sorted(str(p.relative_to(cache.root)) for p in cache.root.rglob("*") if p.is_file())


def test_urls_choose_the_backend(tmp_path, bucket):
    assert isinstance(open_storage(str(tmp_path)), LocalStorage)
    assert open_storage(tmp_path.as_uri()).url == tmp_path.as_uri()
    assert open_storage("relative/models").url == (Path.cwd() / "relative/models").as_uri()
    s3 = open_storage(f"s3://{bucket[1]}/models/prod/")
    assert isinstance(s3, S3Storage) and s3.url == f"s3://{bucket[1]}/models/prod"
    assert open_storage(f"s3://{bucket[1]}").url == f"s3://{bucket[1]}"
    for url in ("http://example.com/models", "s3:///models", "gs:///models", "file://otherhost/models"):
        with pytest.raises(ConfigError) as error:
            open_storage(url)
        assert url in str(error.value) and "s3://BUCKET" in str(error.value) and "file://" in str(error.value)
    with pytest.raises(ConfigError, match="'s3://b/a/../c' has an invalid prefix"):
        open_storage("s3://b/a/../c")


def test_listing_reading_and_downloading(store, local_repository, tmp_path):
    assert store.list_children() == ["tiny"]
    assert store.list_children("tiny") == ["1", "2", "3"]
    assert store.list_children("tiny/1") == ["lib"]
    assert store.list_children("absent") == []
    assert store.exists("tiny/1/manifest.json") and not store.exists("tiny/3/manifest.json")
    assert store.read_bytes("tiny/2/manifest.json") == (local_repository / "tiny/2/manifest.json").read_bytes()
    dest = tmp_path / "model.so"
    store.download("tiny/1/lib/model.so", dest)
    assert dest.read_bytes() == (local_repository / "tiny/1/lib/model.so").read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(KeyNotFound, match="tiny/9/manifest.json"):
        store.read_bytes("tiny/9/manifest.json")
    with pytest.raises(KeyNotFound, match="tiny/1/lib/absent.so"):
        store.download("tiny/1/lib/absent.so", tmp_path / "absent.so")
    assert not (tmp_path / "absent.so").exists()
    with pytest.raises(ValueError, match="invalid storage key"):
        store.read_bytes("tiny/../../secret")


def test_fetch_downloads_and_verifies_once(s3_repository, local_repository, tmp_path):
    _, _, storage = s3_repository
    cache = ServableCache(tmp_path / "cache")
    fetched = cache.fetch(storage, "tiny", 2)
    assert fetched.verified and fetched.directory.is_relative_to(cache.root)
    assert read_manifest(fetched.directory) == read_manifest(local_repository / "tiny" / "2")
    assert (fetched.directory / "lib/model.so").read_bytes() == (local_repository / "tiny/2/lib/model.so").read_bytes()
    assert not [p for p in fetched.directory.parent.iterdir() if p.name.startswith(".")]
    storage.download = None  # a cached version is never downloaded again
    assert cache.fetch(storage, "tiny", 2) == fetched


def test_a_fetch_asks_the_store_nothing_its_manifest_already_says(s3_repository, tmp_path):
    """A file under the ranged-download threshold comes in one GET: the manifest gives its size, so
    the transfer manager's HEAD per file (most of a small file's time) is not asked; what arrives
    is still checked (test_a_broken_upload_leaves_nothing_in_the_cache)."""
    _, _, storage = s3_repository
    calls: list[str] = []
    events = storage._client.meta.events
    events.register("before-call.s3", lambda **kwargs: calls.append(kwargs["model"].name), unique_id="count-calls")
    try:
        fetched = ServableCache(tmp_path / "cache").fetch(storage, "tiny", 2)
    finally:
        events.unregister("before-call.s3", unique_id="count-calls")
    files = read_manifest(fetched.directory).files
    assert "HeadObject" not in calls
    assert calls.count("GetObject") == len(files) + 1, calls  # and the manifest


def test_an_object_larger_than_its_manifest_says_is_refused_without_reading_it_all(s3_repository, tmp_path):
    client, bucket, storage = s3_repository
    key = "models/tiny/1/lib/model.so"
    data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    client.put_object(Bucket=bucket, Key=key, Body=data + bytes(4 << 20))
    cache = ServableCache(tmp_path / "cache")
    with pytest.raises(ServableError, match=f"lib/model.so has [0-9]+ bytes, the manifest says {len(data)}") as error:
        cache.fetch(storage, "tiny", 1)
    received = int(re.search(r"has ([0-9]+) bytes", str(error.value)).group(1))
    assert len(data) < received <= len(data) + (64 << 10)  # it stopped reading a chunk past the size
    assert cached_entries(cache) == []


def test_a_local_store_is_served_in_place(local_repository, tmp_path):
    cache = ServableCache(tmp_path / "cache")
    fetched = cache.fetch(open_storage(str(local_repository)), "tiny", 1)
    assert fetched == FetchedServable(local_repository / "tiny" / "1", verified=False)
    assert not cache.root.exists()
    cache.release(fetched.directory)


def corrupt(client, bucket):
    data = bytearray(client.get_object(Bucket=bucket, Key="models/tiny/1/lib/model.so")["Body"].read())
    data[len(data) // 2] ^= 0xFF
    client.put_object(Bucket=bucket, Key="models/tiny/1/lib/model.so", Body=bytes(data))
    return "lib/model.so has sha256"


def truncated(client, bucket):
    data = client.get_object(Bucket=bucket, Key="models/tiny/1/lib/model.so")["Body"].read()
    client.put_object(Bucket=bucket, Key="models/tiny/1/lib/model.so", Body=data[:1000])
    return "lib/model.so has 1000 bytes, the manifest says 65536"


def deleted(client, bucket):
    client.delete_object(Bucket=bucket, Key="models/tiny/1/weights.bin")
    return "file weights.bin is listed in its manifest but missing from the store"


def partial_upload(client, bucket):
    """The publisher wrote the manifest but stopped before the last file."""
    client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": "models/tiny/1/lib/model.so"}]})
    return "file lib/model.so is listed in its manifest but missing from the store"


def not_json(client, bucket):
    client.put_object(Bucket=bucket, Key="models/tiny/1/manifest.json", Body=b"{not json")
    return "manifest.json cannot be read as JSON"


def escaping_manifest(client, bucket):
    """A manifest that would have the cache write outside the servable's directory."""
    manifest = orjson.loads(client.get_object(Bucket=bucket, Key="models/tiny/1/manifest.json")["Body"].read())
    manifest["files"]["../../outside.so"] = manifest["files"].pop("lib/model.so")
    client.put_object(Bucket=bucket, Key="models/tiny/1/manifest.json", Body=orjson.dumps(manifest))
    return "its manifest lists file '../../outside.so', outside the servable's directory"


@pytest.mark.parametrize("damage", [corrupt, truncated, deleted, partial_upload, not_json, escaping_manifest])
def test_a_broken_upload_leaves_nothing_in_the_cache(s3_repository, tmp_path, damage):
    client, bucket, storage = s3_repository
    expected = damage(client, bucket)
    cache = ServableCache(tmp_path / "cache")
    with pytest.raises(ServableError) as error:
        cache.fetch(storage, "tiny", 1)
    assert expected in str(error.value) and f"s3://{bucket}/models/tiny/1" in str(error.value)
    assert cached_entries(cache) == []


def test_a_version_without_manifest_is_not_published(s3_repository, local_repository, tmp_path):
    client, bucket, storage = s3_repository
    client.put_object(Bucket=bucket, Key="models/tiny/3/lib/model.so", Body=b"half written")
    cache = ServableCache(tmp_path / "cache")
    with pytest.raises(NotPublished, match=f"s3://{bucket}/models/tiny/3 is not published yet"):
        cache.fetch(storage, "tiny", 3)
    with pytest.raises(NotPublished, match="tiny/3 is not published yet"):
        cache.fetch(open_storage(str(local_repository)), "tiny", 3)
    assert cached_entries(cache) == []


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_store_is_retried_then_reported(s3_env, tmp_path):
    s3_env(f"http://127.0.0.1:{closed_port()}")
    storage = open_storage("s3://kiln-models/models", retry=FAST)
    started = time.monotonic()
    with pytest.raises(StorageError) as error:
        ServableCache(tmp_path / "cache").fetch(storage, "tiny", 1)
    message = str(error.value)
    assert message.startswith("reading s3://kiln-models/models/tiny/1/manifest.json failed after 3 attempt(s)")
    assert "Could not connect to the endpoint URL" in message and "Traceback" not in message
    assert time.monotonic() - started < 5
    with pytest.raises(StorageError, match="listing s3://kiln-models/models failed after 3 attempt"):
        storage.list_children()


class Throttling(BaseHTTPRequestHandler):
    """An S3 endpoint that answers 503 SlowDown to its first `server.failures` requests, then
    serves every GET the same small object."""

    def do_GET(self) -> None:
        self.server.requests += 1
        if self.server.requests <= self.server.failures:
            self.send_response(503)
            body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
        else:
            self.send_response(200)
            body = b"the object"
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("failures", [2, 10])
def test_throttling_is_retried(s3_env, failures):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Throttling)
    server.requests, server.failures = 0, failures
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        s3_env(f"http://127.0.0.1:{server.server_address[1]}")
        storage = open_storage("s3://kiln-models", retry=FAST)
        if failures < FAST.attempts:
            assert storage.read_bytes("tiny/1/manifest.json") == b"the object"
        else:
            with pytest.raises(StorageError, match="failed after 3 attempt.*last error: SlowDown .HTTP 503. "
                                                   "Please reduce your request rate"):
                storage.read_bytes("tiny/1/manifest.json")
        assert server.requests == min(failures + 1, FAST.attempts)
    finally:
        server.shutdown()


def test_a_refusal_is_reported_at_once(s3_endpoint, s3_env):
    s3_env(s3_endpoint)
    storage = open_storage("s3://no-such-bucket-here", retry=Retry(attempts=5, delay=10))
    started = time.monotonic()
    with pytest.raises(StorageError, match="listing s3://no-such-bucket-here failed: the store refused it: "
                                           "NoSuchBucket"):
        storage.list_children()
    assert time.monotonic() - started < 5  # not retried


def test_eviction_is_least_recently_used_and_spares_pinned_versions(bucket, tmp_path):
    client, name = bucket
    for version in range(1, 5):
        upload(client, name, fake_servable(tmp_path / "src" / str(version), version=version), f"m/tiny/{version}")
    storage = open_storage(f"s3://{name}/m")
    one = sum(p.stat().st_size for p in (tmp_path / "src" / "1").rglob("*") if p.is_file())
    cache = ServableCache(tmp_path / "cache", max_bytes=2 * one)

    def cached() -> list[str]:
        return sorted(p.name for p in cache.root.glob("*/tiny/*"))

    def fetch(version: int, keep: bool = False) -> FetchedServable:
        fetched = cache.fetch(storage, "tiny", version)
        if not keep:
            cache.release(fetched.directory)
        return fetched

    fetch(1), fetch(2)
    assert cached() == ["1", "2"]
    fetch(1)  # now 2 is the least recently used
    fetch(3)
    assert cached() == ["1", "3"]
    pinned = fetch(1, keep=True)  # least recently used once 3 and 4 are fetched, but in use
    fetch(3), fetch(4)
    assert cached() == ["1", "4"]
    cache.release(pinned.directory)
    fetch(2)
    assert cached() == ["2", "4"]
    with pytest.raises(ValueError, match="is not pinned"):
        cache.release(pinned.directory)


def test_eviction_spares_a_version_another_process_has_pinned(bucket, tmp_path):
    """Workers of `kiln serve` share one cache root: a version one process serves is never evicted
    by another making room."""
    import subprocess
    import sys

    client, name = bucket
    for version in (1, 2):
        upload(client, name, fake_servable(tmp_path / "src" / str(version), version=version), f"m/tiny/{version}")
    one = sum(p.stat().st_size for p in (tmp_path / "src" / "1").rglob("*") if p.is_file())
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys
from pathlib import Path
sys.path.insert(0, ".")
from runtime.servable_cache import ServableCache
from runtime.storage import open_storage
ServableCache(Path({str(tmp_path / "cache")!r})).fetch(open_storage("s3://{name}/m"), "tiny", 1)
print("pinned", flush=True)
sys.stdin.read()
"""], cwd=Path(__file__).resolve().parents[1], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "pinned"
        cache = ServableCache(tmp_path / "cache", max_bytes=one + one // 2)  # room for one version only
        cache.fetch(open_storage(f"s3://{name}/m"), "tiny", 2)
        assert sorted(p.name for p in cache.root.glob("*/tiny/*")) == ["1", "2"], "version 1 is in use elsewhere"
    finally:
        holder.communicate("")


def test_concurrent_fetches_share_one_download(s3_repository, tmp_path):
    _, _, storage = s3_repository
    downloads: list[str] = []
    download = storage.download

    def counted(key: str, dest: Path, size: int | None = None):
        downloads.append(key)
        time.sleep(0.2)  # long enough for every caller to join this fetch
        return download(key, dest, size)

    storage.download = counted
    cache = ServableCache(tmp_path / "cache")
    barrier = threading.Barrier(3)

    def fetch(_) -> FetchedServable:
        barrier.wait()
        return cache.fetch(storage, "tiny", 1)

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(fetch, range(3)))
    assert len(set(results)) == 1 and results[0].verified
    assert sorted(downloads) == ["tiny/1/lib/model.so", "tiny/1/weights.bin"]
    for _ in range(3):  # each caller holds its own pin
        cache.release(results[0].directory)
    with pytest.raises(ValueError):
        cache.release(results[0].directory)


def test_concurrent_fetches_share_one_failure(s3_repository, tmp_path):
    client, bucket, storage = s3_repository
    partial_upload(client, bucket)
    calls = []
    read_bytes = storage.read_bytes

    def slow_read(key: str) -> bytes:
        calls.append(key)
        time.sleep(0.2)
        return read_bytes(key)

    storage.read_bytes = slow_read
    cache = ServableCache(tmp_path / "cache")
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(cache.fetch, storage, "tiny", 1) for _ in range(2)]
        for future in futures:
            with pytest.raises(ServableError, match="lib/model.so is listed"):
                future.result()
    assert calls == ["tiny/1/manifest.json"]
    assert cached_entries(cache) == []


def test_settings_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_SERVABLE_CACHE", str(tmp_path))
    monkeypatch.setenv("KILN_SERVABLE_CACHE_BYTES", "12345")
    cache = ServableCache()
    assert (cache.root, cache.max_bytes) == (tmp_path, 12345)
    monkeypatch.delenv("KILN_SERVABLE_CACHE")
    monkeypatch.delenv("KILN_SERVABLE_CACHE_BYTES")
    assert (ServableCache().root, ServableCache().max_bytes) == (Path("/tmp/kiln-servables"), 8 << 30)
    monkeypatch.setenv("KILN_SERVABLE_CACHE_BYTES", "8GB")
    with pytest.raises(ConfigError, match="KILN_SERVABLE_CACHE_BYTES must be a number of bytes, got '8GB'"):
        ServableCache()


def test_storage_does_not_import_boto3_until_s3_is_used():
    result = run_python("import sys, runtime.storage, runtime.servable_cache; print('boto3' in sys.modules)")
    assert result.stdout.strip() == "False", result.stderr


def test_a_real_servable_from_s3_runs(digits, bucket, tmp_path):
    client, name = bucket
    upload(client, name, digits.servable, "models/digits/1")
    cache = ServableCache(tmp_path / "cache")
    fetched = cache.fetch(open_storage(f"s3://{name}/models"), "digits", 1)
    assert fetched.verified
    engine = open_servable(fetched.directory, verify=not fetched.verified)
    try:
        outputs = engine.run("serving_default", {"images": np.zeros((2, 28, 28, 1), np.float32)})
    finally:
        engine.close()
    assert outputs["probabilities"].shape == (2, 10)
    np.testing.assert_allclose(outputs["probabilities"].sum(axis=1), 1, rtol=1e-5)
    cache.release(fetched.directory)


SERVE_FILES = """
import os
import sys
from pathlib import Path

import boto3
from moto import mock_aws
from moto.server import ThreadedMotoServer

port, bucket, source = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):  # this client talks to moto's backend directly
    os.environ.pop(name, None)
with mock_aws():  # the objects are in place before the server listens
    client = boto3.client("s3", region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    for path in sorted(source.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, path.relative_to(source).as_posix())
    ThreadedMotoServer("127.0.0.1", port, verbose=False).start()
    print("up", flush=True)
    sys.stdin.read()
"""


def serve_files(port: int, bucket: str, source: Path):
    """moto's standalone S3 server in its own process, serving `source` as `bucket` on `port`."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-c", SERVE_FILES, str(port), bucket, str(source)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert process.stdout.readline().strip() == "up"
    return process


def test_a_fetch_survives_a_store_that_stops_mid_way_and_leaves_no_partial_files(s3_env, tmp_path, monkeypatch):
    """moto's server is killed while a version's files are coming in, byte ranges at a time and
    several files at once, and started again (with the same objects): the failed downloads are
    retried, the version arrives whole and verified, and nothing partial is left behind."""
    import runtime.objects as objects_module
    from tests.conftest import free_port

    port = free_port()
    s3_env(f"http://127.0.0.1:{port}")
    source = fake_servable(tmp_path / "store" / "models" / "tiny" / "1", size=12 << 20)

    def serve():
        return serve_files(port, "stopping", tmp_path / "store")

    servers = [serve()]
    received, failures, restarted = [0], [], threading.Event()
    write, transient = objects_module._Hashing.write, S3Storage._transient_cause

    def write_then_stop(self, data) -> int:
        received[0] += len(data)
        if received[0] > (4 << 20) and not failures:
            failures.append("stopped")
            servers[0].kill()  # every connection drops; the ranges still to come fail until it is back
            servers[0].wait()
            threading.Thread(target=lambda: (servers.append(serve()), restarted.set())).start()
        return write(self, data)

    def counted(self, error, what):
        failures.append(what)
        return transient(self, error, what)

    monkeypatch.setattr(objects_module._Hashing, "write", write_then_stop)
    monkeypatch.setattr(S3Storage, "_transient_cause", counted)
    storage = S3Storage("stopping", "models", Retry(attempts=50, delay=0.1, max_delay=0.5, deadline=120),
                        chunk_bytes=1 << 20)
    cache = ServableCache(tmp_path / "cache")
    try:
        fetched = cache.fetch(storage, "tiny", 1)
    finally:
        restarted.wait(60)
        for server in servers:
            server.kill()
            server.wait()
    assert len(failures) > 1 and failures[0] == "stopped"  # it did fail mid-way, and was retried
    assert fetched.verified
    for relative in ("lib/model.so", "weights.bin", "manifest.json"):
        assert (fetched.directory / relative).read_bytes() == (source / relative).read_bytes()
    assert sorted(cached_entries(cache)) == sorted(  # nothing partial: no staging, no temporary file
        str((fetched.directory / relative).relative_to(cache.root)) for relative in
        ("lib/model.so", "weights.bin", "manifest.json"))
