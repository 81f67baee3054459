"""`kiln serve` over a gs:// model repository through google-cloud-storage (Application Default
Credentials in production; here gcp-storage-emulator on loopback, which the client reaches through
STORAGE_EMULATOR_HOST without credentials): versions are fetched and verified into the local cache,
a new version is swapped in while serving, and a corrupted one is refused while the served one stays."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, free_port, stop, wait_until_up
from tests.test_storage import gcs_upload

httpx = pytest.importorskip("httpx")
pytest.importorskip("google.cloud.storage")
DIGIT = {"instances": [[[[0.0]] * 28] * 28]}


def _versions(url: str) -> dict[str, dict]:
    answer = httpx.get(f"{url}/v1/models/digits", timeout=5)
    return {s["version"]: s for s in answer.json().get("model_version_status", [])} if answer.status_code == 200 else {}


def _wait(condition, what: str, process, log_path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what}: {log_path.read_text()[-3000:]}")
        time.sleep(0.2)


def test_serve_from_gs_fetches_verifies_and_swaps(examples, gcs_bucket, gcs_endpoint, tmp_path):
    client, name = gcs_bucket
    bucket = client.bucket(name)
    servable = examples["digits"].servable
    gcs_upload(bucket, servable, "servables/digits/1")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cache = tmp_path / "cache"
    log_path = tmp_path / "serve.log"
    env = {**os.environ, "STORAGE_EMULATOR_HOST": gcs_endpoint, "KILN_SERVABLE_CACHE": str(cache),
           "KILN_WORKERS": "1"}
    env.pop("KILN_GCS_ENDPOINT_URL", None)
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve", "--model-repository",
                                    f"gs://{name}/servables", "--rest-port", str(port), "--grpc-port", "0",
                                    "--host", "127.0.0.1", "--poll-seconds", "0.2"],
                                   cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until_up(process, lambda: httpx.get(f"{url}/v1/models/digits", timeout=2).status_code == 200,
                      log_path, "kiln serve over gs://")
        assert _versions(url)["1"]["state"] == "AVAILABLE"
        assert httpx.post(f"{url}/v1/models/digits:predict", json=DIGIT, timeout=30).status_code == 200
        fetched = {p.name for p in cache.rglob("*") if p.is_file()}
        assert "manifest.json" in fetched and any(n.endswith(".so") for n in fetched)  # downloaded, not read in place

        gcs_upload(bucket, servable, "servables/digits/2")  # published: the manifest went last
        _wait(lambda: _versions(url).get("2", {}).get("state") == "AVAILABLE", "version 2 never became available",
              process, log_path)
        assert httpx.post(f"{url}/v1/models/digits/versions/2:predict", json=DIGIT, timeout=30).status_code == 200
        _wait(lambda: "1" not in _versions(url) or _versions(url)["1"]["state"] == "END",
              "version 1 was not unloaded", process, log_path)

        # Version 3's largest library does not match its manifest: refused; version 2 serves on.
        corrupted = tmp_path / "corrupted"
        shutil.copytree(servable, corrupted)
        largest = max(corrupted.rglob("*.so"), key=lambda p: p.stat().st_size)
        largest.write_bytes(b"\0" * largest.stat().st_size)
        gcs_upload(bucket, corrupted, "servables/digits/3")
        _wait(lambda: _versions(url).get("3", {}).get("status", {}).get("error_code", "OK") != "OK",
              "the corrupted version 3 was not refused", process, log_path)
        refused = _versions(url)["3"]
        assert refused["state"] == "END" and "sha256" in refused["status"]["error_message"], refused
        assert _versions(url)["2"]["state"] == "AVAILABLE"
        assert httpx.post(f"{url}/v1/models/digits:predict", json=DIGIT, timeout=30).status_code == 200
    finally:
        stop(process)
