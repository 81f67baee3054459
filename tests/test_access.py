"""Who may call `kiln serve`: API keys from the environment (401 without one, 403 for a wrong
one, over REST and gRPC; health and metrics open), and CORS for browsers on allowed origins."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from runtime.access import Auth, Cors
from runtime.errors import ConfigError, PermissionDenied, Unauthenticated
from tests.conftest import free_port, kiln_serve

KEYS = "acme:key-of-acme,bare-key"
ORIGIN = "https://app.example.com"


@pytest.fixture(scope="module")
def server(examples, tmp_path_factory):
    grpc_port = free_port()
    with kiln_serve(examples, tmp_path_factory.mktemp("repository"), "--grpc-port", str(grpc_port),
                    "--cors-origins", f"{ORIGIN},https://other.example.com", env={"KILN_API_KEYS": KEYS}) as (_, url):
        yield url, grpc_port


def predict(url: str, **headers: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/models/half_plus_two:predict", json={"instances": [1.0]}, headers=headers)


def test_keys_are_required_and_checked(server):
    url, _ = server
    missing = predict(url)
    assert missing.status_code == 401 and "API key" in missing.json()["error"]
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = predict(url, authorization="Bearer not-a-key")
    assert wrong.status_code == 403 and "not valid" in wrong.json()["error"]
    assert predict(url, authorization="Bearer key-of-acme").json() == {"predictions": [2.5]}
    assert predict(url, **{"x-api-key": "bare-key"}).status_code == 200
    assert httpx.get(f"{url}/v1/models").status_code == 401


def test_health_and_metrics_stay_open(server):
    url, _ = server
    for path in ("/v2/health/live", "/v2/health/ready", "/metrics", "/monitoring/prometheus/metrics"):
        assert httpx.get(f"{url}{path}").status_code == 200, path


def test_grpc_takes_the_key_from_metadata(server):
    grpc = pytest.importorskip("grpc")
    from runtime.codecs.tensor_proto import from_ndarray, to_ndarray
    from runtime.protos import generated_module

    _, grpc_port = server
    stub = generated_module("tensorflow_serving.apis.prediction_service_pb2_grpc").PredictionServiceStub(
        grpc.insecure_channel(f"127.0.0.1:{grpc_port}"))
    request = generated_module("tensorflow_serving.apis.predict_pb2").PredictRequest(model_spec={"name": "half_plus_two"})
    from_ndarray(np.array([1.0], np.float32), request.inputs["x"])
    for metadata, code in (((), grpc.StatusCode.UNAUTHENTICATED),
                           ((("authorization", "Bearer wrong"),), grpc.StatusCode.PERMISSION_DENIED)):
        with pytest.raises(grpc.RpcError) as raised:
            stub.Predict(request, timeout=10, metadata=metadata)
        assert raised.value.code() == code
    response = stub.Predict(request, timeout=10, metadata=(("x-api-key", "key-of-acme"),))
    assert to_ndarray(response.outputs["y"]).tolist() == [2.5]


def test_preflight_from_an_allowed_origin_is_answered_without_a_key(server):
    url, _ = server
    response = httpx.options(f"{url}/v1/models/half_plus_two:predict", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in response.headers["access-control-allow-methods"]
    assert response.headers["access-control-allow-headers"] == "authorization, content-type"
    assert int(response.headers["access-control-max-age"]) > 0 and response.headers["vary"] == "Origin"
    refused = httpx.options(f"{url}/v1/models/half_plus_two:predict", headers={
        "Origin": "https://evil.example.com", "Access-Control-Request-Method": "POST"})
    assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers


def test_answers_to_allowed_origins_carry_cors_headers(server):
    url, _ = server
    allowed = predict(url, origin=ORIGIN, authorization="Bearer key-of-acme")
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "X-Request-Id" in allowed.headers["access-control-expose-headers"]
    denied = predict(url, origin=ORIGIN)  # an error answer is still readable by the page
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == ORIGIN
    other = predict(url, origin="https://evil.example.com", authorization="Bearer key-of-acme")
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


def test_keys_parse_with_tenants_and_refuse_empty_ones():
    auth = Auth.from_env({"KILN_API_KEYS": " acme:k1 , k2,team:with:colon "})
    assert auth.keys == (("acme", "k1"), ("default", "k2"), ("team:with", "colon"))
    assert auth.tenant({"authorization": "Bearer k1"}) == "acme"
    assert auth.tenant({"x-api-key": "k2"}) == "default"
    assert Auth.from_env({}).tenant({}) is None  # off: everyone is let in
    with pytest.raises(Unauthenticated):
        auth.tenant({"authorization": "Basic k1"})
    with pytest.raises(PermissionDenied):
        auth.tenant({"x-api-key": "k3"})
    with pytest.raises(ConfigError, match="empty key"):
        Auth.from_env({"KILN_API_KEYS": "acme:"})


def test_any_origin():
    cors = Cors.parse("*")
    assert cors.headers("https://x.example")["Access-Control-Allow-Origin"] == "https://x.example"
    assert Cors.parse(None).headers("https://x.example") == {}
