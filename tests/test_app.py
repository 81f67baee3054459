"""The protocol-neutral core with TensorFlow Serving's REST routes, over a repository of the example
servables: status, metadata, predict in both formats, and every error as TF Serving answers it."""

from __future__ import annotations

import asyncio
import shutil
import threading

import orjson
import pytest

from runtime.app import App
from runtime.exchange import Request
from runtime.model_config import ModelConfig, ModelConfigList
from runtime.repository import Repository
from runtime.servable_cache import ServableCache
from runtime.version_policy import All


@pytest.fixture(scope="module")
def app(examples, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    for name in ("half_plus_two", "digits"):
        shutil.copytree(examples[name].servable, root / name / "1")
    shutil.copytree(examples["half_plus_two"].servable, root / "half_plus_two" / "2")
    config = ModelConfigList(models=(
        ModelConfig(name="half_plus_two", base_path=str(root / "half_plus_two"), version_policy=All(),
                    version_labels={"stable": 1}),
        ModelConfig(name="digits", base_path=str(root / "digits")),
    ))
    repository = Repository(config, poll_seconds=0, cache=ServableCache(root / ".cache"))
    repository.start()
    yield App(repository, max_body_bytes=1 << 20)
    repository.stop()


def call(app, method, path, body=None):
    response = asyncio.run(app.respond(Request(method, path, {}, body if isinstance(body, bytes) else orjson.dumps(body)
                                              if body is not None else b"")))
    assert response.headers["Content-Type"] == "application/json"
    return response.status, orjson.loads(response.body)


def test_predict_row_and_columnar_as_tf_serving_documents(app):
    assert call(app, "POST", "/v1/models/half_plus_two:predict", {"instances": [1.0, 2.0, 5.0]}) == \
        (200, {"predictions": [2.5, 3.0, 4.5]})
    assert call(app, "POST", "/v1/models/half_plus_two:predict", {"inputs": {"x": [1.0, 2.0]}}) == \
        (200, {"outputs": [2.5, 3.0]})
    assert call(app, "POST", "/v1/models/half_plus_two/versions/1:predict", {"instances": [4.0]}) == \
        (200, {"predictions": [4.0]})
    assert call(app, "POST", "/v1/models/half_plus_two/labels/stable:predict", {"instances": [0.0]}) == \
        (200, {"predictions": [2.0]})


def test_classify_and_regress_as_tf_serving_documents(app):
    body = {"signature_name": "classify_x_to_y", "examples": [{"x": 1.0}, {"x": 2.0}]}
    assert call(app, "POST", "/v1/models/half_plus_two:classify", body) == (200, {"results": [[["", 2.5]], [["", 3.0]]]})
    body = {"signature_name": "regress_x_to_y", "examples": [{"x": 1.0}, {"x": 5.0}]}
    assert call(app, "POST", "/v1/models/half_plus_two:regress", body) == (200, {"results": [2.5, 4.5]})
    body = {"signature_name": "regress_x2_to_y3", "context": {"x2": 4.0}, "examples": [{"x": 1.0}, {}]}
    assert call(app, "POST", "/v1/models/half_plus_two:regress", body) == (200, {"results": [5.0, 5.0]})


@pytest.mark.parametrize("verb, body, message", [
    ("classify", {"examples": [{"x": 1.0}]}, "has method tensorflow/serving/predict; this request needs"),
    ("regress", {"signature_name": "classify_x_to_y", "examples": [{"x": 1.0}]}, "this request needs tensorflow/serving/regress"),
    ("regress", {"signature_name": "regress_x_to_y", "examples": []}, "'examples' must be a non-empty list"),
    ("regress", {"signature_name": "regress_x_to_y", "examples": [{"x": [1.0, "a"]}]}, "mixes kinds of values"),
])
def test_classify_and_regress_errors(app, verb, body, message):
    status, got = call(app, "POST", f"/v1/models/half_plus_two:{verb}", body)
    assert status == 400 and message in got["error"]


def test_status_of_every_version_and_of_one(app):
    status, body = call(app, "GET", "/v1/models/half_plus_two")
    assert status == 200
    assert body == {"model_version_status": [
        {"version": v, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}} for v in ("2", "1")]}
    assert call(app, "GET", "/v1/models/half_plus_two/versions/1")[1]["model_version_status"][0]["version"] == "1"
    assert call(app, "GET", "/v1/models/half_plus_two/labels/stable")[1]["model_version_status"][0]["version"] == "1"


def test_metadata_lists_signatures_as_signature_defs(app):
    status, body = call(app, "GET", "/v1/models/digits/metadata")
    assert status == 200
    assert body["model_spec"] == {"name": "digits", "signature_name": "", "version": "1"}
    signature = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["method_name"] == "tensorflow/serving/predict"
    assert signature["inputs"]["images"]["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in signature["inputs"]["images"]["tensor_shape"]["dim"]] == ["-1", "28", "28", "1"]


def test_percent_encoded_names(app):
    assert call(app, "POST", "/v1/models/half%5Fplus%5Ftwo:predict", {"instances": [1.0]}) == (200, {"predictions": [2.5]})


@pytest.mark.parametrize("method, path, body, status, message", [
    ("POST", "/v1/models/nope:predict", {"instances": [1.0]}, 404, "model 'nope' is not served"),
    ("POST", "/v1/models/half_plus_two/versions/7:predict", {"instances": [1.0]}, 404, "version 7 is not available"),
    ("POST", "/v1/models/half_plus_two/labels/beta:predict", {"instances": [1.0]}, 400, "no version label 'beta'"),
    ("POST", "/v1/models/half_plus_two:predict", b"{not json", 400, "malformed JSON"),
    ("POST", "/v1/models/half_plus_two:predict", {"signature_name": "nope", "instances": [1.0]}, 400,
     "signature 'nope' not found"),
    ("POST", "/v1/models/digits:predict", {"instances": [[1.0, 2.0]]}, 400, "input 'images' must have shape"),
    ("POST", "/v1/models/half_plus_two:predict", b"[" * 100_000 + b"]" * 100_000, 400, "malformed JSON"),
    ("POST", "/v1/models/half_plus_two:predict", b" " * (2 << 20), 413, "the limit is"),
    ("POST", "/v1/models/half_plus_two:explain", {"instances": [1.0]}, 400, "unknown method ':explain'"),
    ("GET", "/v1/models/half_plus_two:predict", None, 400, "takes POST"),
    ("GET", "/v3/health/ready", None, 404, "no such endpoint"),
    ("GET", "/v1/models/half_plus_two/versions/x", None, 400, "Malformed request"),
])
def test_errors_are_tf_serving_json_with_its_statuses(app, method, path, body, status, message):
    got_status, got = call(app, method, path, body)
    assert got_status == status
    assert set(got) == {"error"} and message in got["error"]


@pytest.mark.parametrize("method, path, status, message, api, model", [
    ("POST", "/v1/models/half_plus_two", 400, "POST is not supported on /v1/models/half_plus_two; use GET", "status", ""),
    ("PUT", "/v1/models/half_plus_two/labels/stable/metadata", 400, "use GET", "metadata", ""),
    ("GET", "/v2/models/digits/infer", 400, "GET is not supported on /v2/models/digits/infer; use POST", "infer", ""),
    ("DELETE", "/v1/models/half_plus_two:regress", 400, ":regress takes POST, not DELETE", "regress", ""),
    ("GET", "/v1/models/half_plus_two:explain", 400, ":explain takes POST, not GET", "unknown", ""),
    ("POST", "/metrics", 400, "POST is not supported on /metrics; use GET", "metrics", ""),
    ("GET", "/v2/repository/index", 400, "use POST", "repository_index", ""),
    ("GET", "/v1/models/half_plus_two/metadata/more", 400, "Malformed request", "unknown", ""),
    ("GET", "/v2/models/digits/versions/one", 404, "no such endpoint", "unknown", ""),
    ("GET", "/v1/models/half_plus_two", 200, None, "status", "half_plus_two"),
    ("GET", "/v1/models/half_plus_two/labels/stable", 200, None, "status", "half_plus_two"),
    ("GET", "/v2/models/digits/versions/1/ready", 200, None, "ready", "digits"),
])
def test_each_route_names_its_api_and_the_method_it_takes(app, method, path, status, message, api, model):
    """The route table: a path's route labels the request's metrics with its api (and, once it holds
    one, its model) whether or not it is answered; another method is refused naming the one taken."""
    labels = {"model": model, "version": "", "api": api, "protocol": "rest", "status": str(status)}
    before = app.metrics.registry.get_sample_value("kiln_requests_total", labels) or 0
    got_status, got = call(app, method, path)
    assert got_status == status
    assert message is None or message in got["error"]
    assert app.metrics.registry.get_sample_value("kiln_requests_total", labels) == before + 1


def test_oip_health_metadata_and_readiness(app):
    assert call(app, "GET", "/v2/health/live") == (200, {"live": True})
    assert call(app, "GET", "/v2/health/ready") == (200, {"ready": True})
    assert call(app, "GET", "/v2")[1]["name"] == "kiln"
    assert call(app, "GET", "/v2/models/digits/ready") == (200, {"name": "digits", "ready": True})
    status, body = call(app, "GET", "/v2/models/digits")
    assert status == 200
    assert body["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 28, 28, 1]}]
    assert body["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    assert call(app, "GET", "/v2/models/nope/ready")[0] == 404


def test_oip_infer_json_tensors(app):
    request = {"id": "r1", "inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1.0, 2.0, 5.0]}]}
    status, body = call(app, "POST", "/v2/models/half_plus_two/versions/2/infer", request)
    assert status == 200
    assert body == {"model_name": "half_plus_two", "model_version": "2", "id": "r1",
                    "outputs": [{"name": "y", "shape": [3], "datatype": "FP32", "data": [2.5, 3.0, 4.5]}]}
    image = {"name": "images", "shape": [2, 28, 28, 1], "datatype": "FP32", "data": [0.5] * (2 * 784)}
    status, body = call(app, "POST", "/v2/models/digits/infer", {"inputs": [image], "outputs": [{"name": "probabilities"}]})
    assert status == 200 and body["outputs"][0]["shape"] == [2, 10]


@pytest.mark.parametrize("request_body, message", [
    ({"inputs": []}, "'inputs' must be a non-empty list"),
    ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0]}]}, "needs 2 values, data has 1"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "INT64", "data": [1]}]}, "must have datatype FP32, got INT64"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP99", "data": [1]}]}, "unknown datatype"),
    ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}], "outputs": [{"name": "z"}]},
     "unknown output(s) z"),
])
def test_oip_errors(app, request_body, message):
    status, body = call(app, "POST", "/v2/models/half_plus_two/infer", request_body)
    assert status == 400 and message in body["error"]


def test_a_deadline_passing_while_the_model_runs_answers_504_and_the_work_keeps_its_version(app, monkeypatch):
    with app.repository.hold("half_plus_two", version=1) as handle:
        engine, held = handle.engine, handle.held
    release, original = threading.Event(), engine.run

    def slow(key, inputs):
        release.wait(30)
        return original(key, inputs)

    monkeypatch.setattr(engine, "run", slow)
    request = Request("POST", "/v1/models/half_plus_two/versions/1:predict", {"x-kiln-timeout-ms": "1000"},
                      orjson.dumps({"instances": [1.0]}))
    loop = asyncio.new_event_loop()  # kept open: asyncio.run would wait for the work at its end
    try:
        response = loop.run_until_complete(app.respond(request))
        assert response.status == 504 and "before the model answered" in orjson.loads(response.body)["error"]
        assert held.in_flight == 1  # the request has gone; its running work still holds the version
        release.set()
        loop.run_until_complete(loop.shutdown_default_executor())
        assert held.in_flight == 0
    finally:
        release.set()
        loop.close()
