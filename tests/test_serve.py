"""`kiln serve` as a user runs it: a real process on loopback, spoken to over HTTP."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.conftest import kiln_serve


@pytest.fixture(scope="module")
def server(examples, tmp_path_factory):
    # Splitting: the drain test's request is larger than max_batch_size (1000).
    with kiln_serve(examples, tmp_path_factory.mktemp("repository"), "--enable-large-batch-splitting") as (process, url):
        yield url, process


def test_predict_status_and_errors_over_http(server):
    url, _ = server
    response = httpx.post(f"{url}/v1/models/half_plus_two:predict", json={"instances": [1.0, 2.0, 5.0]})
    assert response.status_code == 200 and response.json() == {"predictions": [2.5, 3.0, 4.5]}
    assert response.headers["content-type"] == "application/json"
    status = httpx.get(f"{url}/v1/models/digits").json()["model_version_status"]
    assert status == [{"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]
    missing = httpx.post(f"{url}/v1/models/nope:predict", json={"instances": [1.0]})
    assert missing.status_code == 404 and "nope" in missing.json()["error"]
    malformed = httpx.post(f"{url}/v1/models/half_plus_two:predict", content=b"{nope")
    assert malformed.status_code == 400 and "malformed JSON" in malformed.json()["error"]


def test_tritonclient_http_speaks_the_open_inference_protocol(server):
    import numpy as np
    import tritonclient.http as triton

    url, _ = server
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
    metadata = client.get_model_metadata("digits")
    assert metadata["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 28, 28, 1]}]
    images = triton.InferInput("images", [3, 28, 28, 1], "FP32")
    images.set_data_from_numpy(np.full((3, 28, 28, 1), 0.5, np.float32), binary_data=False)
    result = client.infer("digits", [images], outputs=[triton.InferRequestedOutput("probabilities", binary_data=False)])
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (3, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert not client.is_model_ready("nope")


def test_oversized_body_is_refused_with_413(server):
    url, _ = server
    response = httpx.post(f"{url}/v1/models/half_plus_two:predict", content=b" " * (65 << 20))
    assert response.status_code == 413 and "limit" in response.json()["error"]


def test_sigterm_lets_in_flight_requests_finish(server):
    """uvicorn finishes what is in flight, then exits by the signal it caught (status -15)."""
    url, process = server
    image = [[[0.5]] * 28] * 28
    body = json.dumps({"instances": [image] * 3000})  # encoded first: it takes about a second under load
    answers = []
    in_flight = threading.Thread(target=lambda: answers.append(httpx.post(
        f"{url}/v1/models/digits:predict", content=body, headers={"Content-Type": "application/json"}, timeout=60)))
    in_flight.start()
    time.sleep(0.5)  # the body is sent and the batch is running
    process.send_signal(signal.SIGTERM)
    in_flight.join()
    assert answers[0].status_code == 200 and len(answers[0].json()["predictions"]) == 3000
    assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    assert "Traceback" not in process.log_path.read_text()
