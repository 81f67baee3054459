"""Shared fixtures: the example servables (built once, cached under ~/.cache/kiln), and moto's
S3-compatible server on loopback with boto3 pointed at it through its standard variables."""

from __future__ import annotations

import logging
import os
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def repository(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("repository")


@pytest.fixture(scope="session")
def examples(repository):
    from examples.build import build_examples

    return build_examples(repository)


@pytest.fixture(scope="session")
def digits(examples):
    return examples["digits"]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's standalone S3 server, in a thread of this process, on a free loopback port."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer("127.0.0.1", 0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(monkeypatch, tmp_path):
    """boto3's standard settings, and nothing from this machine's own AWS configuration."""

    def point_at(endpoint: str) -> None:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return point_at


@pytest.fixture
def bucket(s3_endpoint, s3_env):
    """A fresh bucket; returns a boto3 client and its name."""
    import boto3

    s3_env(s3_endpoint)
    client = boto3.client("s3")
    name = f"kiln-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return client, name


@pytest.fixture(scope="session")
def gcs_endpoint():
    """gcp-storage-emulator (a GCS JSON API server in Python), in a thread of this process, in memory,
    on a free loopback port: google-cloud-storage reaches it through its STORAGE_EMULATOR_HOST."""
    from gcp_storage_emulator.server import create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # it logs every 404
    server = create_server("127.0.0.1", free_port(), in_memory=True)
    server._api.daemon = True  # its thread must not keep a failed run alive
    server.start()
    host, port = server._api._httpd.server_address
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def gcs_bucket(gcs_endpoint, monkeypatch):
    """A fresh bucket in the emulator, with the client pointed at it; returns (client, bucket name)."""
    from google.cloud import storage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_endpoint)
    monkeypatch.delenv("KILN_GCS_ENDPOINT_URL", raising=False)
    client = storage.Client()
    name = f"kiln-{uuid.uuid4().hex[:12]}"
    client.create_bucket(name)
    return client, name


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_examples(examples, root: Path, names=("half_plus_two", "digits")) -> Path:
    """A model repository at root: the example servables named, as NAME/1."""
    import shutil

    for name in names:
        shutil.copytree(examples[name].servable, root / name / "1")
    return root


@contextmanager
def kiln_serve(examples, root: Path, *args: str, env: dict | None = None):
    """`kiln serve` in its own process over half_plus_two and digits (version 1) copied into root,
    on free loopback ports, with `env` added to the environment (one worker unless it sets
    KILN_WORKERS); yields (process, REST URL) once both models answer status (with the first key of
    KILN_API_KEYS, if env gives one)."""
    import subprocess

    import httpx

    install_examples(examples, root)
    port = free_port()
    log = (root / "serve.log").open("w+")  # a file, not a pipe: nobody reads the log while it runs
    process = subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve", "--model-repository", str(root),
                                "--rest-port", str(port), "--grpc-port", "0", "--host", "127.0.0.1", *args],
                               cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "KILN_WORKERS": "1", **(env or {})})  # test_workers: more
    process.log_path = root / "serve.log"
    url = f"http://127.0.0.1:{port}"
    key = (env or {}).get("KILN_API_KEYS", "").split(",")[0].rpartition(":")[2]
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    wait_until_up(process, lambda: all(
        httpx.get(f"{url}/v1/models/{name}", timeout=2, headers=headers).status_code == 200
        for name in ("half_plus_two", "digits")), process.log_path, "kiln serve")
    try:
        yield process, url
    finally:
        stop(process)
        log.close()


def wait_until_up(process, ready, log_path: Path, what: str, seconds: float = 120) -> None:
    """Poll ready() (HTTP calls to the process) until it holds; if the process exits or the time runs
    out first, kill it and fail the test with its log."""
    import time

    import httpx

    deadline = time.monotonic() + seconds
    while True:
        try:
            if ready():
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{what} did not come up: {log_path.read_text()}")
        time.sleep(0.2)


def stop(process, grace: float = 30) -> None:
    """SIGTERM, then SIGKILL if it has not exited after grace seconds."""
    import subprocess

    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()


def run_python(code: str, *args: str, env: dict | None = None):
    """Run code in a fresh interpreter (nothing imported yet), from the repository root."""
    import subprocess

    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=600)
