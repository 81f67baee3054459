"""`kiln serve --grpc-port` spoken to with tensorflow-serving-api's own stubs (a test-only
dependency, installed without its TensorFlow requirement pinning: pip install --no-deps)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import free_port, kiln_serve

pytest.importorskip("tensorflow_serving")
grpc = pytest.importorskip("grpc")
tf = pytest.importorskip("tensorflow")

from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2,  # noqa: E402
                                     get_model_status_pb2, inference_pb2, model_management_pb2,
                                     model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc,
                                     regression_pb2)
from tensorflow_serving.config import model_server_config_pb2  # noqa: E402


@pytest.fixture(scope="module")
def served(examples, tmp_path_factory):
    """(channel, repository root) of a server on loopback. Large batches are split, so a request of
    many rows is valid work that takes a while (the deadline test needs one). Reload is open, as in
    TF Serving (no keys here; tests/test_admin.py has the administrator's)."""
    grpc_port = free_port()
    root = tmp_path_factory.mktemp("repository")
    with kiln_serve(examples, root, "--grpc-port", str(grpc_port), "--enable-large-batch-splitting",
                    "--reload", "open"):
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=[("grpc.max_send_message_length", -1)])
        yield channel, root
        channel.close()


@pytest.fixture(scope="module")
def channel(served):
    return served[0]


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


def _examples(*rows: dict, context: dict | None = None):
    """An Input of tf.Examples with float features, as a client builds it."""
    def example(features: dict) -> tf.train.Example:
        return tf.train.Example(features=tf.train.Features(feature={
            key: tf.train.Feature(float_list=tf.train.FloatList(value=[value])) for key, value in features.items()}))

    request_input = classification_pb2.ClassificationRequest().input
    if context is None:
        request_input.example_list.examples.extend(example(row) for row in rows)
    else:
        request_input.example_list_with_context.examples.extend(example(row) for row in rows)
        request_input.example_list_with_context.context.CopyFrom(example(context))
    return request_input


def test_classify_and_regress_as_tf_serving_documents(channel):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = classification_pb2.ClassificationRequest(input=_examples({"x": 1.0}, {"x": 2.0}))
    request.model_spec.name, request.model_spec.signature_name = "half_plus_two", "classify_x_to_y"
    response = stub.Classify(request, timeout=10)
    assert [[(c.label, c.score) for c in row.classes] for row in response.result.classifications] == \
        [[("", 2.5)], [("", 3.0)]]
    assert response.model_spec.version.value == 1 and response.model_spec.signature_name == "classify_x_to_y"

    request = regression_pb2.RegressionRequest(input=_examples({"x": 1.0}, {"x": 5.0}))
    request.model_spec.name, request.model_spec.signature_name = "half_plus_two", "regress_x_to_y"
    assert [r.value for r in stub.Regress(request, timeout=10).result.regressions] == [2.5, 4.5]

    # The context's features reach every example; an example's own feature wins over the context's.
    request = regression_pb2.RegressionRequest(input=_examples({"x": 1.0}, {"x2": 2.0}, context={"x2": 4.0}))
    request.model_spec.name, request.model_spec.signature_name = "half_plus_two", "regress_x2_to_y3"
    assert [r.value for r in stub.Regress(request, timeout=10).result.regressions] == [5.0, 4.0]  # x2/2 + 3


def test_multi_inference_runs_every_task_on_the_same_examples(channel):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = inference_pb2.MultiInferenceRequest(input=_examples({"x": 1.0}, {"x": 3.0}))
    for signature, method in (("classify_x_to_y", "tensorflow/serving/classify"),
                              ("regress_x_to_y2", "tensorflow/serving/regress")):
        task = request.tasks.add(method_name=method)
        task.model_spec.name, task.model_spec.signature_name = "half_plus_two", signature
    classified, regressed = stub.MultiInference(request, timeout=10).results
    assert [row.classes[0].score for row in classified.classification_result.classifications] == [2.5, 3.5]
    assert classified.model_spec.signature_name == "classify_x_to_y"
    assert [r.value for r in regressed.regression_result.regressions] == [3.5, 4.5]  # x/2 + 3
    assert regressed.model_spec.version.value == 1


@pytest.mark.parametrize("tasks, message", [
    ([], "at least one task"),
    ([("half_plus_two", "classify_x_to_y", "tensorflow/serving/classify"),
      ("digits", "serving_default", "tensorflow/serving/classify")], "same model"),
    ([("half_plus_two", "regress_x_to_y", "tensorflow/serving/regress")] * 2, "only one task"),
    ([("half_plus_two", "serving_default", "tensorflow/serving/predict")], "unsupported method"),
    ([("half_plus_two", "regress_x_to_y", "tensorflow/serving/classify")], "this request needs tensorflow/serving/classify"),
])
def test_multi_inference_refuses_what_tf_serving_refuses(channel, tasks, message):
    request = inference_pb2.MultiInferenceRequest(input=_examples({"x": 1.0}))
    for model, signature, method in tasks:
        task = request.tasks.add(method_name=method)
        task.model_spec.name, task.model_spec.signature_name = model, signature
    with pytest.raises(grpc.RpcError) as raised:
        prediction_service_pb2_grpc.PredictionServiceStub(channel).MultiInference(request, timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in raised.value.details()


def test_classify_without_examples_or_on_a_predict_signature_is_invalid(channel):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    empty = classification_pb2.ClassificationRequest(model_spec={"name": "half_plus_two",
                                                                 "signature_name": "classify_x_to_y"})
    with pytest.raises(grpc.RpcError) as raised:
        stub.Classify(empty, timeout=10)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "Input is empty" in raised.value.details()
    wrong = classification_pb2.ClassificationRequest(input=_examples({"x": 1.0}), model_spec={"name": "half_plus_two"})
    assert _code(stub.Classify, wrong, timeout=10) == grpc.StatusCode.INVALID_ARGUMENT


def test_reload_config_adds_and_removes_models(served):
    """HandleReloadConfigRequest with TensorFlow Serving's own ModelServerConfig message: the new
    list is served, what it drops is unloaded."""
    channel, root = served
    models = model_service_pb2_grpc.ModelServiceStub(channel)

    def reload(*names: str) -> None:
        config = model_server_config_pb2.ModelServerConfig()
        for name in names:
            config.model_config_list.config.add(name=name, base_path=str(root / name), model_platform="tensorflow")
        response = models.HandleReloadConfigRequest(
            model_management_pb2.ReloadConfigRequest(config=config), timeout=60)
        assert response.status.error_code == 0

    reload("digits")
    dropped = _predict_request("half_plus_two", x=np.array([1.0], np.float32))
    assert _code(prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict, dropped,
                 timeout=10) == grpc.StatusCode.NOT_FOUND
    (status,) = _status(models, "half_plus_two").model_version_status  # as TF Serving: END, not forgotten
    assert status.state == get_model_status_pb2.ModelVersionStatus.END
    reload("digits", "half_plus_two")
    (status,) = _status(models, "half_plus_two").model_version_status
    assert status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    bad = model_server_config_pb2.ModelServerConfig()
    bad.model_config_list.config.add(name="digits", base_path=str(root / "digits"), version_labels={"stable": 7})
    with pytest.raises(grpc.RpcError) as raised:
        models.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=bad), timeout=60)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "stable" in raised.value.details()
    (status,) = _status(models, "half_plus_two").model_version_status  # a refused config changes nothing
    assert status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
