"""The Open Inference Protocol over gRPC: `kiln serve --grpc-port` spoken to with tritonclient.grpc,
unchanged, and with the raw stubs of tritonclient's own grpc_service.proto messages where the client
has no call for it (typed contents, malformed requests). Answers are compared with the REST routes'
(`/v2/...` on JSON tensors) of the same server."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.conftest import free_port, kiln_serve

grpcclient = pytest.importorskip("tritonclient.grpc")
grpc = pytest.importorskip("grpc")

from google.protobuf import json_format  # noqa: E402
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def server(examples, tmp_path_factory):
    """(tritonclient.grpc client, gRPC address, REST URL)."""
    grpc_port = free_port()
    # Splitting: the timeout test's request is larger than max_batch_size.
    with kiln_serve(examples, tmp_path_factory.mktemp("repository"), "--grpc-port", str(grpc_port),
                    "--enable-large-batch-splitting") as (_, url):
        address = f"127.0.0.1:{grpc_port}"
        client = grpcclient.InferenceServerClient(address)
        yield client, address, url
        client.close()


@pytest.fixture(scope="module")
def stub(server):
    """tritonclient's generated stub for the calls its client does not offer."""
    channel = grpc.insecure_channel(server[1])
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def images(count: int) -> np.ndarray:
    return np.random.default_rng(count).random((count, 28, 28, 1), dtype=np.float32)


def infer_input(name: str, array: np.ndarray, datatype: str | None = None) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype or {"float32": "FP32"}[array.dtype.name])
    tensor.set_data_from_numpy(array)
    return tensor


def rest_infer(url: str, model: str, name: str, array: np.ndarray) -> np.ndarray:
    """The same inference over REST with JSON tensors: the numbers gRPC must reproduce exactly."""
    response = httpx.post(f"{url}/v2/models/{model}/infer", json={"inputs": [
        {"name": name, "shape": list(array.shape), "datatype": "FP32", "data": array.ravel().tolist()}]})
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    return np.asarray(output["data"], np.float32).reshape(output["shape"])


def failure(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as raised:
        call(*args, **kwargs)
    return raised.value


def test_liveness_and_readiness_agree_with_rest(server):
    client, _, url = server
    assert client.is_server_live() and client.is_server_ready()
    assert httpx.get(f"{url}/v2/health/ready").json() == {"ready": True}
    assert client.is_model_ready("digits") and client.is_model_ready("half_plus_two", "1")
    assert httpx.get(f"{url}/v2/models/digits/ready").status_code == 200
    # Not served: not ready (REST answers 404, which tritonclient.http reads as not ready too).
    assert not client.is_model_ready("nope") and not client.is_model_ready("digits", "7")
    assert httpx.get(f"{url}/v2/models/nope/ready").status_code == 404
    assert httpx.get(f"{url}/v2/models/digits/versions/7/ready").status_code == 404
    error = failure(client.is_model_ready, "digits", "one")
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "'one'" in error.message()


def test_server_metadata_agrees_with_rest(server):
    client, _, url = server
    metadata = client.get_server_metadata()
    assert metadata.name == "kiln" and "binary_tensor_data" in metadata.extensions
    assert json_format.MessageToDict(metadata) == httpx.get(f"{url}/v2").json()


def test_model_metadata_agrees_with_rest(server):
    client, _, url = server
    metadata = client.get_model_metadata("digits")
    (images_spec,) = metadata.inputs
    assert (images_spec.name, images_spec.datatype, list(images_spec.shape)) == ("images", "FP32", [-1, 28, 28, 1])
    (probabilities,) = metadata.outputs
    assert (probabilities.name, probabilities.datatype, list(probabilities.shape)) == \
        ("probabilities", "FP32", [-1, 10])
    assert list(metadata.versions) == ["1"]
    for model, version in (("digits", ""), ("half_plus_two", "1")):
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "")
        rest = json_format.ParseDict(httpx.get(f"{url}{path}").json(), service_pb2.ModelMetadataResponse())
        assert client.get_model_metadata(model, version) == rest
    error = failure(client.get_model_metadata, "nope")
    assert error.status() == "StatusCode.NOT_FOUND" and "'nope'" in error.message()


def test_infer_digits_matches_rest(server):
    client, _, url = server
    batch = images(3)
    result = client.infer("digits", [infer_input("images", batch)])
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (3, 10) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert np.array_equal(probabilities, rest_infer(url, "digits", "images", batch))
    response = result.get_response()
    assert (response.model_name, response.model_version) == ("digits", "1")


def test_infer_half_plus_two_with_version_id_and_requested_output(server):
    client, _, url = server
    x = np.array([1.0, 2.0, 5.0, -3.5, 1e-3], np.float32)
    result = client.infer("half_plus_two", [infer_input("x", x)], model_version="1", request_id="r-7",
                           outputs=[grpcclient.InferRequestedOutput("y")])
    assert np.array_equal(result.as_numpy("y"), x / 2 + 2)
    assert np.array_equal(result.as_numpy("y"), rest_infer(url, "half_plus_two", "x", x))
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("half_plus_two", "1", "r-7")
    assert [output.name for output in response.outputs] == ["y"]


def test_typed_contents_give_the_same_answer_as_raw_contents(server, stub):
    client, _, _ = server
    batch = images(2)
    request = service_pb2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="images", datatype="FP32", shape=batch.shape).contents.fp32_contents.extend(batch.ravel())
    response = stub.ModelInfer(request, timeout=30)
    (output,) = response.outputs
    typed = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(output.shape)
    assert np.array_equal(typed, client.infer("digits", [infer_input("images", batch)]).as_numpy("probabilities"))


@pytest.mark.parametrize("model, tensor, code, words", [
    ("digits", ("images", np.zeros((1, 28, 28, 1)), "FP64"), "INVALID_ARGUMENT",
     ["input 'images' must have datatype FP32, got FP64"]),
    ("digits", ("images", np.zeros((1, 28, 28), np.float32), None), "INVALID_ARGUMENT",
     ["input 'images' must have shape [-1, 28, 28, 1], got [1, 28, 28]"]),
    ("digits", ("pixels", np.zeros((1, 28, 28, 1), np.float32), None), "INVALID_ARGUMENT",
     ["unknown input 'pixels'", "images"]),
    ("nope", ("images", np.zeros((1, 28, 28, 1), np.float32), None), "NOT_FOUND", ["'nope'"]),
])
def test_bad_requests_get_their_codes_and_name_the_problem(server, model, tensor, code, words):
    client, _, _ = server
    name, array, datatype = tensor
    error = failure(client.infer, model, [infer_input(name, array, datatype)])
    assert error.status() == f"StatusCode.{code}"
    for word in words:
        assert word in error.message()


def test_unknown_versions_and_outputs(server):
    client, _, _ = server
    error = failure(client.infer, "digits", [infer_input("images", images(1))], model_version="7")
    assert error.status() == "StatusCode.NOT_FOUND" and "7" in error.message()
    error = failure(client.infer, "digits", [infer_input("images", images(1))],
                    outputs=[grpcclient.InferRequestedOutput("logits")])
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "unknown output(s) logits; the model has probabilities" in error.message()


@pytest.mark.parametrize("build, words", [
    (lambda r: r.raw_input_contents.append(b"\0" * 12), "needs 3136 bytes of binary data, got 12"),
    (lambda r: r.raw_input_contents.extend([b"\0" * 3136, b"\0" * 3136]),
     "raw_input_contents has 2 entries for 1 inputs"),
    (lambda r: r.inputs[0].contents.fp32_contents.extend([0.5] * 3), "needs 784 values, contents.fp32_contents has 3"),
    (lambda r: (r.inputs[0].contents.fp32_contents.extend([0.5] * 784), r.raw_input_contents.append(b"\0" * 3136)),
     "input 'images' has contents, but the request gives raw_input_contents"),
])
def test_malformed_tensor_data_is_invalid_argument(stub, build, words):
    request = service_pb2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="images", datatype="FP32", shape=[1, 28, 28, 1])
    build(request)
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(request, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in raised.value.details()


def test_a_client_timeout_is_honoured_and_the_server_goes_on(server):
    """client_timeout becomes the call's gRPC deadline: 8192 images take the model about a second."""
    client, _, _ = server
    error = failure(client.infer, "digits", [infer_input("images", images(8192))], client_timeout=0.3)
    assert error.status() == "StatusCode.DEADLINE_EXCEEDED"
    result = client.infer("digits", [infer_input("images", images(1))], client_timeout=30)
    assert result.as_numpy("probabilities").shape == (1, 10)


def test_tritons_other_methods_are_unimplemented(stub):
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelConfig(service_pb2.ModelConfigRequest(name="digits"), timeout=10)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_bytes_that_are_not_a_request_are_invalid_argument(server):
    call = grpc.insecure_channel(server[1]).unary_unary("/inference.GRPCInferenceService/ModelInfer")
    with pytest.raises(grpc.RpcError) as raised:
        call(b"\xff\xff\xff", timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inference.ModelInferRequest" in raised.value.details()
