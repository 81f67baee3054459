"""What batch scoring needs of a store (runtime/storage.py), locally and against moto's S3 server on
loopback: atomic writes, listing at any depth, identities that change with the contents, streaming
reads that carry on after a dropped connection but never mix two versions of an object, deletes,
and gs:// through the S3-interoperable API."""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest

from runtime.storage import KeyNotFound, LocalStorage, ObjectChanged, Retry, S3Storage, open_storage

FAST = Retry(attempts=4, delay=0.01, max_delay=0.05, deadline=10)


@pytest.fixture(params=["local", "s3", "gcs"])
def store(request, tmp_path):
    if request.param == "local":
        return open_storage(str(tmp_path / "store"))
    if request.param == "gcs":  # gs:// with google-cloud-storage, against its emulator
        _, name = request.getfixturevalue("gcs_bucket")
        return open_storage(f"gs://{name}/root", retry=FAST)
    _, name = request.getfixturevalue("bucket")
    return open_storage(f"s3://{name}/root", retry=FAST)


def test_write_read_overwrite_and_delete(store):
    store.write_bytes("a/b/c.jsonl", b"first")
    assert store.read_bytes("a/b/c.jsonl") == b"first" and store.exists("a/b/c.jsonl")
    store.write_bytes("a/b/c.jsonl", b"second, longer")
    assert store.read_bytes("a/b/c.jsonl") == b"second, longer"
    store.delete("a/b/c.jsonl")
    store.delete("a/b/c.jsonl")  # nothing there: no error
    assert not store.exists("a/b/c.jsonl")
    with pytest.raises(KeyNotFound):
        store.read_bytes("a/b/c.jsonl")
    with pytest.raises(KeyNotFound):
        store.stat("a/b/c.jsonl")


def test_list_keys_finds_files_at_any_depth_sorted(store):
    for key in ("z.csv", "d/2.jsonl", "d/1.jsonl", "d/e/3.jsonl", "dd/4.jsonl"):
        store.write_bytes(key, b"x")
    assert store.list_keys() == ["d/1.jsonl", "d/2.jsonl", "d/e/3.jsonl", "dd/4.jsonl", "z.csv"]
    assert store.list_keys("d") == ["d/1.jsonl", "d/2.jsonl", "d/e/3.jsonl"]  # a directory, not a string prefix
    assert store.list_keys("d/e/") == ["d/e/3.jsonl"]
    assert store.list_keys("missing") == []


def test_identity_changes_with_the_contents_and_the_reader_streams_one_version(store):
    store.write_bytes("rows.jsonl", b"1\n2\n")
    first = store.stat("rows.jsonl")
    assert first.size == 4
    info, stream = store.reader("rows.jsonl")
    with stream:
        assert info == first and stream.read() == b"1\n2\n"
    time.sleep(0.01)
    store.write_bytes("rows.jsonl", b"3\n4\n5\n")
    assert store.stat("rows.jsonl").identity != first.identity


def test_a_local_write_is_atomic_and_leaves_no_temporary_file(tmp_path):
    store = LocalStorage(tmp_path)
    store.write_bytes("out/part.jsonl", b"old")
    seen = set()
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.add(store.read_bytes("out/part.jsonl"))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(50):
            store.write_bytes("out/part.jsonl", b"new" * 100_000)
            store.write_bytes("out/part.jsonl", b"old")
    finally:
        stop.set()
        watcher.join()
    assert seen <= {b"old", b"new" * 100_000}
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["part.jsonl"]


def test_a_local_write_that_cannot_happen_is_a_storage_error(tmp_path):
    from runtime.errors import StorageError

    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match="cannot write .*file/x"):
        LocalStorage(tmp_path).write_bytes("file/x", b"")


class CuttingProxy(ThreadingHTTPServer):
    """An HTTP proxy in front of moto that, for the first `cuts` GETs of an object's body, sends the
    headers and only half the body before it closes the connection; `before_retry` runs once,
    after the first cut."""

    def __init__(self, upstream: str, cuts: int, before_retry=None):
        self.upstream, self.cuts, self.before_retry = urlparse(upstream), cuts, before_retry
        self.ranges: list[str | None] = []
        super().__init__(("127.0.0.1", 0), _Forward)


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _forward(self):
        server: CuttingProxy = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        connection = http.client.HTTPConnection(server.upstream.hostname, server.upstream.port)
        connection.request(self.command, self.path, body, {k: v for k, v in self.headers.items()})
        answer = connection.getresponse()
        data = answer.read()
        cut = self.command == "GET" and "list-type" not in self.path and answer.status in (200, 206) \
            and server.cuts > 0 and len(data) > 1
        if self.command == "GET" and "list-type" not in self.path:
            server.ranges.append(self.headers.get("Range"))
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(name, value)
        self.send_header("Content-Length", answer.getheader("Content-Length") if self.command == "HEAD" else str(len(data)))
        self.end_headers()
        if cut:
            server.cuts -= 1
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            if server.before_retry is not None:
                server.before_retry()
                server.before_retry = None
            return
        self.wfile.write(data)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward


@pytest.fixture
def proxied(s3_endpoint, s3_env, bucket):
    """Start a CuttingProxy and point boto3 at it; yields (start(cuts, before_retry) -> proxy, client, bucket)."""
    client, name = bucket
    servers = []

    def start(cuts: int, before_retry=None) -> CuttingProxy:
        proxy = CuttingProxy(s3_endpoint, cuts, before_retry)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        servers.append(proxy)
        s3_env(f"http://127.0.0.1:{proxy.server_address[1]}")
        return proxy

    yield start, client, name
    for proxy in servers:
        proxy.shutdown()


def test_a_dropped_read_carries_on_where_it_stopped(proxied):
    start, client, name = proxied
    data = bytes(range(256)) * 4096  # 1 MiB
    client.put_object(Bucket=name, Key="big.jsonl", Body=data)
    proxy = start(cuts=2)
    info, stream = open_storage(f"s3://{name}", retry=FAST).reader("big.jsonl")
    with stream:
        assert stream.read() == data
    assert info.size == len(data)
    assert proxy.ranges[0] is None and all(r and r.startswith("bytes=") for r in proxy.ranges[1:])
    assert len(proxy.ranges) == 3


def test_an_object_replaced_during_a_read_is_never_mixed(proxied):
    start, client, name = proxied
    client.put_object(Bucket=name, Key="rows.jsonl", Body=b"a" * 100_000)
    start(cuts=1, before_retry=lambda: client.put_object(Bucket=name, Key="rows.jsonl", Body=b"b" * 100_000))
    _, stream = open_storage(f"s3://{name}", retry=FAST).reader("rows.jsonl")
    with stream, pytest.raises(ObjectChanged, match=f"reading s3://{name}/rows.jsonl: the object was replaced"):
        stream.read()


def test_gs_urls_use_the_interoperable_api(bucket, s3_endpoint, monkeypatch):
    client, name = bucket
    client.put_object(Bucket=name, Key="in/rows.jsonl", Body=b"1\n")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("KILN_GCS_ENDPOINT_URL", s3_endpoint)
    store = open_storage(f"gs://{name}/in")
    assert isinstance(store, S3Storage) and store.url == f"gs://{name}/in"
    assert store.list_keys() == ["rows.jsonl"] and store.read_bytes("rows.jsonl") == b"1\n"
    store.write_bytes("more/rows.jsonl", b"2\n")
    assert client.get_object(Bucket=name, Key="in/more/rows.jsonl")["Body"].read() == b"2\n"


def test_gs_without_credentials_is_a_clear_error(tmp_path):
    """No Application Default Credentials anywhere (no file, no metadata server: a closed loopback
    port stands in for it): opening a gs:// store says so, naming the store."""
    from tests.conftest import free_port, run_python

    result = run_python("from runtime.storage import open_storage\n"
                        "try:\n    open_storage('gs://kiln-no-such/models')\n"
                        "except Exception as e:\n    print(type(e).__name__, e)",
                        env={"STORAGE_EMULATOR_HOST": "", "KILN_GCS_ENDPOINT_URL": "",
                             "GOOGLE_APPLICATION_CREDENTIALS": "", "CLOUDSDK_CONFIG": str(tmp_path),
                             "GCE_METADATA_HOST": f"127.0.0.1:{free_port()}",
                             "GCE_METADATA_IP": f"127.0.0.1:{free_port()}"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("StorageError cannot open gs://kiln-no-such"), result.stdout
    assert "credentials" in result.stdout.lower()
