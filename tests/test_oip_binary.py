"""The Open Inference Protocol's binary tensor data extension over REST: tritonclient.http in its
default mode (binary inputs and outputs) against `kiln serve`, the wire format itself, malformed
bodies, and the binary form of every datatype (shared with gRPC's raw contents)."""

from __future__ import annotations

import httpx
import numpy as np
import orjson
import pytest

from runtime.codecs import oip
from runtime.errors import InvalidInput
from runtime.manifest import Signature, TensorSpec
from tests.conftest import kiln_serve

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import (InferenceServerException, deserialize_bytes_tensor,  # noqa: E402
                                serialize_byte_tensor)

X = np.array([1.0, 2.0, 5.0, -3.5, 1e-3], np.float32)


@pytest.fixture(scope="module")
def server(examples, tmp_path_factory):
    with kiln_serve(examples, tmp_path_factory.mktemp("repository")) as (_, url):
        client = httpclient.InferenceServerClient(url.removeprefix("http://"))
        yield client, url
        client.close()


def images(count: int) -> np.ndarray:
    return np.random.default_rng(count).random((count, 28, 28, 1), dtype=np.float32)


def infer(client, model: str, name: str, array: np.ndarray, output: str | None, binary_in: bool,
          binary_out: bool) -> np.ndarray:
    tensor = httpclient.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array, binary_data=binary_in)
    outputs = None if output is None else [httpclient.InferRequestedOutput(output, binary_data=binary_out)]
    result = client.infer(model, [tensor], outputs=outputs)
    (answer,) = result.get_response()["outputs"]
    assert ("parameters" in answer and "data" not in answer) == binary_out
    return result.as_numpy(answer["name"])


def test_server_metadata_lists_the_extension(server):
    _, url = server
    assert httpx.get(f"{url}/v2").json()["extensions"] == ["model_repository", "binary_tensor_data"]


@pytest.mark.parametrize("model, name, array, output", [
    ("digits", "images", images(3), "probabilities"),
    ("half_plus_two", "x", X, "y"),
])
def test_tritonclient_binary_mode_matches_json(server, model, name, array, output):
    """Binary in and out (tritonclient's default), every mix, and all outputs by the request's
    binary_data_output: the same numbers as JSON in and out."""
    client, _ = server
    reference = infer(client, model, name, array, output, binary_in=False, binary_out=False)
    for binary_in, binary_out in ((True, True), (True, False), (False, True)):
        assert np.array_equal(infer(client, model, name, array, output, binary_in, binary_out), reference)
    assert np.array_equal(infer(client, model, name, array, None, binary_in=True, binary_out=True), reference)
    if model == "digits":
        assert reference.shape == (3, 10)
        np.testing.assert_allclose(reference.sum(axis=1), 1, atol=1e-5)
    else:
        assert np.array_equal(reference, X / 2 + 2)


def binary_request(inputs: list[dict], raw: bytes, **extra) -> tuple[bytes, bytes]:
    """(the JSON header, the whole body)."""
    header = orjson.dumps({"inputs": inputs, **extra})
    return header, header + raw


def x_input(size: int | object = 12, shape: list[int] | None = None, **fields) -> dict:
    """half_plus_two's input x, its data binary."""
    return {"name": "x", "shape": shape or [3], "datatype": "FP32", "parameters": {"binary_data_size": size}, **fields}


TWELVE = X[:3].tobytes()


def test_the_wire_format(server):
    _, url = server
    header, body = binary_request([x_input()], TWELVE, outputs=[{"name": "y", "parameters": {"binary_data": True}}],
                                  id="b1")
    response = httpx.post(f"{url}/v2/models/half_plus_two/infer", content=body,
                          headers={"Inference-Header-Content-Length": str(len(header))})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    length = int(response.headers["inference-header-content-length"])
    assert orjson.loads(response.content[:length]) == {
        "model_name": "half_plus_two", "model_version": "1", "id": "b1",
        "outputs": [{"name": "y", "shape": [3], "datatype": "FP32", "parameters": {"binary_data_size": 12}}]}
    assert response.content[length:] == (X[:3] / 2 + 2).tobytes()
    # Binary inputs, JSON outputs: an ordinary JSON answer.
    header, body = binary_request([x_input()], TWELVE)
    response = httpx.post(f"{url}/v2/models/half_plus_two/infer", content=body,
                          headers={"Inference-Header-Content-Length": str(len(header))})
    assert response.headers["content-type"] == "application/json"
    assert "inference-header-content-length" not in response.headers
    assert response.json()["outputs"][0]["data"] == [2.5, 3.0, 4.5]


@pytest.mark.parametrize("inputs, raw, header, words, extra", [
    ([x_input()], TWELVE, 10_000, "Inference-Header-Content-Length is 10000, but the body has only", {}),
    ([x_input()], TWELVE, "twelve", "Inference-Header-Content-Length must be a number of bytes, got 'twelve'", {}),
    ([x_input()], TWELVE, None, "a body with binary tensor data needs the Inference-Header-Content-Length header", {}),
    ([x_input()], b"", None, "has a binary_data_size parameter, but the request has no "
                             "Inference-Header-Content-Length header", {}),
    ([x_input(16)], TWELVE, "json", "binary_data_size is 16, but only 12 bytes of binary data are left", {}),
    ([x_input(8)], TWELVE[:8], "json", "input 'x': shape [3] of FP32 needs 12 bytes of binary data, got 8", {}),
    ([x_input(8, [2])], TWELVE, "json", "4 bytes of binary data after the JSON that no input's binary_data_size "
                                        "accounts for", {}),
    ([x_input(-1)], TWELVE, "json", "binary_data_size must be a non-negative integer, got -1", {}),
    ([x_input("12")], TWELVE, "json", "binary_data_size must be a non-negative integer, got '12'", {}),
    ([x_input(data=[1.0, 2.0, 5.0])], TWELVE, "json", "input 'x' has both 'data' and a binary_data_size", {}),
    ([{"name": "x", "shape": [3], "datatype": "FP32"}], b"", "json",
     "input 'x' has neither 'data' nor a binary_data_size", {}),
    ([x_input()], TWELVE, "json", "output 'y': parameter binary_data must be true or false, got 'yes'",
     {"outputs": [{"name": "y", "parameters": {"binary_data": "yes"}}]}),
    ([x_input()], TWELVE, 5, "malformed JSON", {}),
])
def test_malformed_binary_bodies_are_400(server, inputs, raw, header, words, extra):
    _, url = server
    json_header, body = binary_request(inputs, raw, **extra)
    headers = {} if header is None else {
        "Inference-Header-Content-Length": str(len(json_header) if header == "json" else header)}
    response = httpx.post(f"{url}/v2/models/half_plus_two/infer", content=body, headers=headers)
    assert response.status_code == 400 and response.headers["content-type"] == "application/json"
    assert words in response.json()["error"]


def test_tritonclient_sees_the_error(server):
    client, _ = server
    tensor = httpclient.InferInput("x", [3], "FP64")
    tensor.set_data_from_numpy(X[:3].astype(np.float64))
    with pytest.raises(InferenceServerException, match="input 'x' must have datatype FP32, got FP64"):
        client.infer("half_plus_two", [tensor])


# --- the binary form of every datatype (runtime.codecs.oip.from_raw / to_raw) ------------------

def test_every_datatype_round_trips_and_matches_tritonclients_bytes():
    rng = np.random.default_rng(0)
    for kind, dtype in oip.DATATYPES.items():
        if kind == "BYTES":
            array = np.array([b"", b"a", "é".encode(), bytes(range(256)), b"\0" * 5, b"z"], dtype=object).reshape(2, 3)
            theirs = serialize_byte_tensor(array).item()
        elif kind == "BOOL":
            array = rng.random((2, 3)) > 0.5
            theirs = array.tobytes()
        else:
            array = (rng.random((2, 3)) * 100).astype(dtype)
            theirs = array.tobytes()
        assert oip.to_raw(array) == (kind, theirs), kind
        back = oip.from_raw("t", kind, [2, 3], theirs)
        assert back.dtype == (object if kind == "BYTES" else dtype) and back.shape == (2, 3), kind
        assert back.tolist() == array.tolist(), kind
    text = np.array(["ü", "ok"], dtype=object)
    assert deserialize_bytes_tensor(oip.to_raw(text)[1]).tolist() == ["ü".encode(), b"ok"]


@pytest.mark.parametrize("kind, shape, raw, words", [
    ("BYTES", [1], b"\x05\0\0", "ends inside an element's 4-byte length"),
    ("BYTES", [1], b"\x05\0\0\0abc", "a BYTES element of 5 bytes runs past the end"),
    ("BYTES", [3], b"\x01\0\0\0a\x01\0\0\0b", "shape [3] needs 3 BYTES elements, the binary data has 2"),
    ("BOOL", [2], b"\x01\x02", "BOOL binary data must hold bytes 0 and 1 only"),
    ("INT64", [2], b"\0" * 12, "shape [2] of INT64 needs 16 bytes of binary data, got 12"),
])
def test_malformed_binary_tensors(kind, shape, raw, words):
    with pytest.raises(InvalidInput, match="input 't'") as raised:
        oip.from_raw("t", kind, shape, raw)
    assert words in str(raised.value)


def test_binary_inputs_are_checked_against_the_signature_like_json_ones():
    signature = Signature(engine="saved-model", inputs=(TensorSpec(name="x", dtype="float16", shape=(None, 2)),),
                          outputs=(TensorSpec(name="y", dtype="float16", shape=(None, 2)),))
    half = np.array([[1.5, -2.0]], np.float16)
    header = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP16",
                                       "parameters": {"binary_data_size": 4}}],
                           "parameters": {"binary_data_output": True}})
    request = oip.read_infer(header + half.tobytes(), signature, str(len(header)))
    assert np.array_equal(request.inputs["x"], half) and request.binary("y")
    body, length = oip.write_infer("m", 1, {"y": half}, request)
    assert orjson.loads(body[:length])["outputs"][0]["parameters"] == {"binary_data_size": 4}
    assert body[length:] == half.tobytes()
    wrong = orjson.dumps({"inputs": [{"name": "x", "shape": [2], "datatype": "FP16",
                                      "parameters": {"binary_data_size": 4}}]})
    with pytest.raises(InvalidInput, match=r"input 'x' must have shape \[-1, 2\], got \[2\]"):
        oip.read_infer(wrong + half.tobytes(), signature, len(wrong))
