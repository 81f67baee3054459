"""What `kiln serve` tells its operators: Prometheus metrics at TF Serving's path and /metrics,
JSON log lines that carry each request's id, the list of served models, and deadlines over HTTP."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port, kiln_serve

IMAGE = [[[0.5]] * 28] * 28


@pytest.fixture(scope="module")
def server(examples, tmp_path_factory):
    grpc_port = free_port()
    with kiln_serve(examples, tmp_path_factory.mktemp("repository"), "--grpc-port", str(grpc_port),
                    "--access-log") as (process, url):
        yield process, url, grpc_port


def samples(url: str, path: str = "/monitoring/prometheus/metrics") -> dict:
    """{(sample name, frozenset of labels): value} of one scrape."""
    response = httpx.get(f"{url}{path}")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(scrape: dict, name: str, **labels) -> float:
    return scrape.get((name, frozenset(labels.items())), 0.0)


def test_requests_latency_and_batch_sizes_are_counted(server):
    _, url, _ = server
    before = samples(url)
    for rows in (1, 3, 5):
        assert httpx.post(f"{url}/v1/models/digits:predict", json={"instances": [IMAGE] * rows}).status_code == 200
    assert httpx.post(f"{url}/v1/models/digits:predict", json={"instances": [[1.0]]}).status_code == 400
    assert httpx.post(f"{url}/v2/models/digits/infer", json={"inputs": [
        {"name": "images", "shape": [2, 28, 28, 1], "datatype": "FP32", "data": [0.5] * (2 * 784)}]}).status_code == 200
    after = samples(url, "/metrics")

    def delta(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ok = {"model": "digits", "version": "1", "api": "predict", "protocol": "rest"}
    assert delta("kiln_requests_total", **ok, status="200") == 3
    assert delta("kiln_requests_total", **ok, status="400") == 1
    assert delta("kiln_requests_total", **{**ok, "api": "infer"}, status="200") == 1
    assert delta("kiln_request_duration_seconds_count", model="digits", api="predict", protocol="rest") == 4
    batch = {"model": "digits", "version": "1", "signature": "serving_default"}
    assert delta("kiln_batch_size_count", **batch) == 4 and delta("kiln_batch_size_sum", **batch) == 1 + 3 + 5 + 2
    assert delta("kiln_batch_size_bucket", **batch, le="4.0") == 3
    assert delta("kiln_execution_seconds_count", **batch) == 4
    assert value(after, "kiln_queue_depth", model="digits") == 0


def test_grpc_calls_are_counted_with_their_codes(server):
    grpc = pytest.importorskip("grpc")
    from runtime.codecs.tensor_proto import from_ndarray
    from runtime.protos import generated_module

    _, url, grpc_port = server
    predict_pb2 = generated_module("tensorflow_serving.apis.predict_pb2")
    stub = generated_module("tensorflow_serving.apis.prediction_service_pb2_grpc").PredictionServiceStub(
        grpc.insecure_channel(f"127.0.0.1:{grpc_port}"))
    before = samples(url)
    request = predict_pb2.PredictRequest(model_spec={"name": "digits"})
    from_ndarray(np.full((2, 28, 28, 1), 0.5, np.float32), request.inputs["images"])
    stub.Predict(request, timeout=10)
    with pytest.raises(grpc.RpcError):
        stub.Predict(predict_pb2.PredictRequest(model_spec={"name": "nope"}), timeout=10)
    after = samples(url)
    labels = {"api": "predict", "protocol": "grpc"}
    assert value(after, "kiln_requests_total", model="digits", version="1", status="OK", **labels) - \
        value(before, "kiln_requests_total", model="digits", version="1", status="OK", **labels) == 1
    assert value(after, "kiln_requests_total", model="", version="", status="NOT_FOUND", **labels) - \
        value(before, "kiln_requests_total", model="", version="", status="NOT_FOUND", **labels) == 1


def test_model_loads_and_cold_start_are_reported(server):
    _, url, _ = server
    scrape = samples(url)
    for name in ("digits", "half_plus_two"):
        assert value(scrape, "kiln_model_version_state", model=name, version="1", state="AVAILABLE") == 1
        assert value(scrape, "kiln_model_load_seconds", model=name, version="1") > 0
        assert value(scrape, "kiln_model_warmup_seconds", model=name, version="1") > 0
    cold_start = value(scrape, "kiln_cold_start_seconds")
    assert 0 < cold_start < 120
    assert value(scrape, "process_start_time_seconds") > 0


def test_logs_are_json_lines_carrying_the_request_id(server):
    process, url, _ = server
    response = httpx.post(f"{url}/v1/models/digits:predict", json={"instances": [[1.0]]},
                          headers={"X-Request-Id": "trace-4242"})
    assert response.status_code == 400 and response.headers["x-request-id"] == "trace-4242"
    fresh = httpx.get(f"{url}/v1/models/digits").headers["x-request-id"]
    assert len(fresh) == 32 and fresh != "trace-4242" and fresh != httpx.get(f"{url}/v2").headers["x-request-id"]
    lines = [json.loads(line) for line in process.log_path.read_text().splitlines() if line.startswith("{")]
    (entry,) = [line for line in lines if line.get("request_id") == "trace-4242"]
    assert entry["severity"] == "INFO" and entry["logger"] == "kiln.access"
    assert entry["message"] == "POST /v1/models/digits:predict 400"
    assert entry["model"] == "digits" and entry["api"] == "predict" and entry["duration_ms"] > 0
    assert any(line.get("request_id") == fresh for line in lines)


def test_served_models_are_listed(server):
    tritonclient_http = pytest.importorskip("tritonclient.http")
    _, url, _ = server
    listed = httpx.get(f"{url}/v1/models").json()["models"]
    assert [(m["name"], m["versions"]) for m in listed] == [
        ("digits", [{"version": "1", "state": "AVAILABLE"}]), ("half_plus_two", [{"version": "1", "state": "AVAILABLE"}])]
    client = tritonclient_http.InferenceServerClient(url.removeprefix("http://"))
    assert client.get_model_repository_index() == [
        {"name": "digits", "version": "1", "state": "READY", "reason": ""},
        {"name": "half_plus_two", "version": "1", "state": "READY", "reason": ""}]


def test_a_deadline_in_a_header_is_honoured(server):
    _, url, _ = server
    big = {"instances": [IMAGE] * 2000}
    response = httpx.post(f"{url}/v1/models/digits:predict", json=big, headers={"X-Kiln-Timeout-Ms": "1"}, timeout=60)
    assert response.status_code == 504 and "deadline" in response.json()["error"]
    response = httpx.post(f"{url}/v1/models/digits:predict", json={"instances": [IMAGE]},
                          headers={"X-Kiln-Timeout-Ms": "30000"})
    assert response.status_code == 200
    for bad in ("soon", "-5", "0", "nan", "inf"):
        response = httpx.post(f"{url}/v1/models/digits:predict", json={"instances": [IMAGE]},
                              headers={"X-Kiln-Timeout-Ms": bad})
        assert response.status_code == 400 and "X-Kiln-Timeout-Ms" in response.json()["error"]


def test_a_request_over_max_batch_size_is_refused_as_tf_serving_does(server):
    _, url, _ = server
    response = httpx.post(f"{url}/v1/models/half_plus_two:predict", json={"instances": [1.0] * 1001})
    assert response.status_code == 400
    assert response.json() == {"error": "Task size 1001 is larger than maximum batch size 1000"}
