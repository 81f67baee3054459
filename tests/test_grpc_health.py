"""grpc.health.v1.Health on `kiln serve`, asked with grpcio-health-checking's own client stub: the
server's status follows readiness (every configured model available), each model's its availability;
Watch streams the change when a model's first version is published."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, free_port, stop, wait_until_up

grpc = pytest.importorskip("grpc")
httpx = pytest.importorskip("httpx")
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

Status = health_pb2.HealthCheckResponse


def _check(stub, service: str) -> int:
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_follows_readiness(examples, tmp_path):
    root = tmp_path / "repository"
    shutil.copytree(examples["digits"].servable, root / "digits" / "1")
    (root / "half_plus_two").mkdir()  # configured, no version published yet: not ready
    rest, grpc_port = free_port(), free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve", "--model-repository", str(root),
                                    "--rest-port", str(rest), "--grpc-port", str(grpc_port), "--host", "127.0.0.1",
                                    "--poll-seconds", "0.2"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "KILN_API_KEYS": "secret"})  # health needs no key
    try:
        wait_until_up(process, lambda: httpx.get(f"http://127.0.0.1:{rest}/v1/models/digits", timeout=2,
                                                 headers={"Authorization": "Bearer secret"}).status_code == 200,
                      log_path, "kiln serve")
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watch = stub.Watch(health_pb2.HealthCheckRequest(service="half_plus_two"), timeout=120)
            assert next(watch).status == Status.NOT_SERVING
            assert _check(stub, "") == Status.NOT_SERVING  # a configured model is not available
            assert _check(stub, "digits") == Status.SERVING
            with pytest.raises(grpc.RpcError) as raised:
                _check(stub, "nope")
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND

            staged = root / "half_plus_two" / ".staged"
            shutil.copytree(examples["half_plus_two"].servable, staged)
            staged.rename(root / "half_plus_two" / "1")  # published whole
            assert next(watch).status == Status.SERVING
            watch.cancel()
            assert _check(stub, "half_plus_two") == Status.SERVING
            assert _check(stub, "") == Status.SERVING
    finally:
        stop(process)
