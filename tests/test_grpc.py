"""`kiln serve --grpc-port` spoken to with tensorflow-serving-api's own stubs (a test-only
dependency, installed without its TensorFlow requirement pinning: pip install --no-deps)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import free_port, kiln_serve

pytest.importorskip("tensorflow_serving")
grpc = pytest.importorskip("grpc")
tf = pytest.importorskip("tensorflow")

from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,  # noqa: E402
                                     model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc)


@pytest.fixture(scope="module")
def channel(examples, tmp_path_factory):
    grpc_port = free_port()
    with kiln_serve(examples, tmp_path_factory.mktemp("repository"), "--grpc-port", str(grpc_port)):
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=[("grpc.max_send_message_length", -1)])
        yield channel
        channel.close()


def _status(models, name: str):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name
    return models.GetModelStatus(request, timeout=5)


def _predict_request(name: str, **inputs) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return request


def _input_name(channel, model: str) -> str:
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = model
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(request, timeout=10)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    return next(iter(signatures.signature_def["serving_default"].inputs))


def test_predict_half_plus_two(channel):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    key = _input_name(channel, "half_plus_two")
    response = stub.Predict(_predict_request("half_plus_two", **{key: np.array([1, 2, 5], np.float32)}), timeout=10)
    (output,) = response.outputs.values()
    np.testing.assert_allclose(tf.make_ndarray(output), [2.5, 3.0, 4.5])
    assert response.model_spec.name == "half_plus_two" and response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"


def test_predict_digits_from_tensor_content(channel):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = _predict_request("digits", images=np.full((3, 28, 28, 1), 0.5, np.float32))
    assert request.inputs["images"].tensor_content and not request.inputs["images"].float_val
    response = stub.Predict(request, timeout=10)
    probabilities = tf.make_ndarray(response.outputs["probabilities"])
    assert probabilities.shape == (3, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)


def test_model_status_is_available(channel):
    models = model_service_pb2_grpc.ModelServiceStub(channel)
    (status,) = _status(models, "digits").model_version_status
    assert status.version == 1
    assert status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert status.status.error_code == 0 and status.status.error_message == ""


def test_metadata_has_the_signature_def(channel):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "digits"
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(request, timeout=10)
    assert response.model_spec.name == "digits" and response.model_spec.version.value == 1
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    images = signatures.signature_def["serving_default"].inputs["images"]
    assert images.dtype == tf.float32.as_datatype_enum
    assert [dim.size for dim in images.tensor_shape.dim] == [-1, 28, 28, 1]
    assert "probabilities" in signatures.signature_def["serving_default"].outputs


def _code(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as raised:
        call(*args, **kwargs)
    return raised.value.code()


def test_errors_carry_tf_serving_codes(channel):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    missing = _predict_request("nope", images=np.zeros((1, 28, 28, 1), np.float32))
    assert _code(stub.Predict, missing, timeout=10) == grpc.StatusCode.NOT_FOUND
    assert _code(model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus,
                 get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "nope"}),
                 timeout=10) == grpc.StatusCode.NOT_FOUND
    wrong_shape = _predict_request("digits", images=np.zeros((2, 28, 28), np.float32))
    assert _code(stub.Predict, wrong_shape, timeout=10) == grpc.StatusCode.INVALID_ARGUMENT


def test_a_short_deadline_is_exceeded_and_the_server_goes_on(channel):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    big = _predict_request("digits", images=np.full((4096, 28, 28, 1), 0.5, np.float32))
    assert _code(stub.Predict, big, timeout=0.05) == grpc.StatusCode.DEADLINE_EXCEEDED
    small = _predict_request("digits", images=np.full((1, 28, 28, 1), 0.5, np.float32))
    assert tf.make_ndarray(stub.Predict(small, timeout=30).outputs["probabilities"]).shape == (1, 10)
