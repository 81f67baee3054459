"""TF Serving's metric names and labels on `kiln serve`'s Prometheus page after real REST and gRPC
requests (runtime/tfserving_metrics.py), beside Kiln's own."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tests.conftest import free_port, kiln_serve

httpx = pytest.importorskip("httpx")
grpc = pytest.importorskip("grpc")
pytest.importorskip("tensorflow_serving")


def _samples(page: str) -> dict[tuple[str, frozenset], float]:
    """{(name, labels): value} of a Prometheus text page."""
    found = {}
    for line in page.splitlines():
        match = re.fullmatch(r"([:\w]+)(?:\{(.*)\})? (\S+)", line)
        if match and not line.startswith("#"):
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            found[match.group(1), labels] = float(match.group(3))
    return found


def test_tf_serving_names_and_labels_after_requests(examples, tmp_path):
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    grpc_port = free_port()
    with kiln_serve(examples, tmp_path, "--grpc-port", str(grpc_port)) as (_, url):
        assert httpx.post(f"{url}/v1/models/half_plus_two:predict", json={"instances": [1.0, 2.0]}).status_code == 200
        assert httpx.post(f"{url}/v1/models/digits:predict", json={"instances": [[1.0]]}).status_code == 400
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "digits"
            tensor = request.inputs["images"]
            tensor.dtype = 1  # DT_FLOAT
            for size in (1, 28, 28, 1):
                tensor.tensor_shape.dim.add().size = size
            tensor.tensor_content = np.zeros((1, 28, 28, 1), np.float32).tobytes()
            prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=10)
        page = httpx.get(f"{url}/monitoring/prometheus/metrics").text
    samples = _samples(page)

    def value(name: str, **labels: str) -> float:
        return samples[name, frozenset(labels.items())]

    assert value(":tensorflow:serving:request_count", model_name="half_plus_two", status="OK") == 1
    assert value(":tensorflow:serving:request_count", model_name="digits", status="INVALID_ARGUMENT") == 1
    assert value(":tensorflow:serving:request_count", model_name="digits", status="OK") == 1
    assert "# TYPE :tensorflow:serving:request_latency histogram" in page
    assert value(":tensorflow:serving:request_latency_count", model_name="half_plus_two", API="Predict",
                 entrypoint="REST") == 1
    assert value(":tensorflow:serving:request_latency_count", model_name="digits", API="Predict",
                 entrypoint="GRPC") == 1
    assert value(":tensorflow:serving:request_latency_bucket", model_name="digits", API="Predict",
                 entrypoint="GRPC", le="10.0") == 0  # microseconds: nothing answers within 10 µs
    assert value(":tensorflow:serving:request_latency_bucket", model_name="digits", API="Predict",
                 entrypoint="GRPC", le="+Inf") == 1
    assert value(":tensorflow:serving:runtime_latency_count", model_name="digits", API="Predict",
                 runtime="xla-aot") == 1
    assert value(":tensorflow:serving:runtime_latency_count", model_name="half_plus_two", API="Predict",
                 runtime="xla-aot") == 1
    runs = value(":tensorflow:core:graph_runs")
    assert runs >= 2 and value(":tensorflow:core:graph_run_time_usecs_histogram_count") == runs
    assert value(":tensorflow:core:graph_run_time_usecs") > 0
    assert any(name.startswith("kiln_requests") for name, _ in samples)  # Kiln's own stay
