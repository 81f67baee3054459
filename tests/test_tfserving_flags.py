"""TF Serving's command line on `kiln serve` (runtime/tfserving_flags.py): a real server started with
tensorflow_model_server's flags answers REST and gRPC, and the flags' translation, refusals and
warnings, and the image's MODEL_NAME / MODEL_BASE_PATH, each by name."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

import pytest

from runtime.errors import ConfigError
from runtime.tfserving_flags import add_flags, apply, screen
from tests.conftest import ROOT, free_port, stop, wait_until_up

httpx = pytest.importorskip("httpx")
grpc = pytest.importorskip("grpc")


def _parsed(*argv: str) -> argparse.Namespace:
    """The serve flags apply() reads, as kiln serve's parser leaves them."""
    parser = argparse.ArgumentParser()
    for name in ("--model-repository", "--model-name", "--model-config-file", "--batching"):
        parser.add_argument(name, dest="mode" if name == "--batching" else None)
    parser.add_argument("--rest-port", type=int, default=8501)
    parser.add_argument("--grpc-port", type=int, default=8500)
    add_flags(parser)
    return parser.parse_args(list(argv))


def test_tensorflow_model_servers_command_line_serves(examples, tmp_path):
    base = tmp_path / "models"
    shutil.copytree(examples["half_plus_two"].servable, base / "half_plus_two" / "1")
    (tmp_path / "monitoring.config").write_text('prometheus_config { enable: true path: "/custom/metrics" }\n')
    rest, grpc_port = free_port(), free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "serve", f"--port={grpc_port}", f"--rest_api_port={rest}",
             "--model_name=half_plus_two", f"--model_base_path={base}/half_plus_two", "--host", "127.0.0.1",
             f"--monitoring_config_file={tmp_path / 'monitoring.config'}", "--tensorflow_intra_op_parallelism=2",
             "--rest_api_timeout_in_ms=30000"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{rest}"
    try:
        wait_until_up(process, lambda: httpx.get(f"{url}/v1/models/half_plus_two", timeout=2).status_code == 200,
                      log_path, "kiln serve with TF Serving's flags")
        answer = httpx.post(f"{url}/v1/models/half_plus_two:predict", json={"instances": [1.0, 2.0, 5.0]})
        assert answer.json() == {"predictions": [2.5, 3.0, 4.5]}
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:  # gRPC on --port
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="half_plus_two"),
                                                               timeout=10)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        assert ":tensorflow:serving:request_count" in httpx.get(f"{url}/custom/metrics").text
        assert httpx.get(f"{url}/monitoring/prometheus/metrics").status_code == 404  # the config moved it
    finally:
        stop(process)
    assert "ignoring TensorFlow Serving's --tensorflow_intra_op_parallelism" in log_path.read_text()


def test_flags_carry_tf_servings_meanings():
    args = _parsed("--port=9000", "--rest_api_port=9001", "--model_name=m", "--model_base_path=/models/x",
                   "--file_system_poll_wait_seconds=5", "--rest_api_timeout_in_ms=1500")
    overrides = apply(args, {})
    assert (args.grpc_port, args.rest_port) == (9000, 9001)
    assert overrides == {"model_base_path": "/models/x", "model_name": "m", "poll_seconds": 5.0, "mode": "off",
                         "rest_timeout_seconds": 1.5}  # batching off: TF Serving's default
    assert apply(_parsed("--model_config_file=m.config", "--enable_batching"), {})["mode"] == "fixed"
    assert apply(_parsed("--model_config_file=m.config", "--enable_batching=false"), {})["mode"] == "off"
    assert apply(_parsed("--model_config_file=m.config", "--batching", "adaptive"), {}).get("mode") is None
    assert apply(_parsed("--model-repository", "servables"), {}) == {}  # Kiln's own flags: Kiln's defaults


def test_the_images_variables():
    assert apply(_parsed(), {"MODEL_NAME": "resnet"}) == {
        "model_base_path": "/models/resnet", "model_name": "resnet", "mode": "off"}
    assert apply(_parsed(), {"MODEL_NAME": "r", "MODEL_BASE_PATH": "s3://b/m"})["model_base_path"] == "s3://b/m/r"
    assert apply(_parsed("--model-repository", "servables"), {"MODEL_NAME": "r"}) == {}  # Kiln's flags win
    args = _parsed("--port=8500", "--rest_api_port=8501")  # the serve image's entrypoint
    assert apply(args, {"MODEL_NAME": "r"})["model_base_path"] == "/models/r" and args.grpc_port == 8500


def test_flags_kiln_cannot_honour_are_named():
    with pytest.raises(ConfigError, match="--ssl_config_file is not supported"):
        screen(["--ssl_config_file=/etc/ssl.config"])
    with pytest.raises(ConfigError, match="--model_config_file_poll_wait_seconds"):
        screen(["--model_config_file_poll_wait_seconds=60"])
    with pytest.raises(ConfigError, match="--enable_model_warmup=false"):
        screen(["--enable_model_warmup=false"])
    assert screen(["--enable_model_warmup=true", "--model_config_file_poll_wait_seconds=0", "--port=1"]) == ["--port=1"]
    assert screen(["--rest_api_num_threads", "8", "--port=1"]) == ["--port=1"]  # warned, value taken with it
    with pytest.raises(ConfigError, match="--model_name needs --model_base_path"):
        apply(_parsed("--model_name=m"), {})
