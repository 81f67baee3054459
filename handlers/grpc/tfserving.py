"""TensorFlow Serving's gRPC API (PredictionService, ModelService) for `kiln serve`.

The servicers only adapt: they turn TensorProtos and tf.Examples into arrays with runtime.codecs,
resolve the ModelSpec with the core's repository, and hand the model work to `App.execute`, as the
REST routes do (same thread pool, deadlines, metrics). `serve_call` wraps every call, here and in the
Open Inference Protocol's service: request id, authentication from metadata, the client's deadline,
a KilnError mapped to its gRPC code through runtime.errors.status_of, the metrics and the access log.
The messages are Kiln's own generated ones, wire-identical to tensorflow-serving-api's; grpc is
imported by the handlers only.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
from google.protobuf import json_format

from handlers.grpc.call import Service, serve_call
from runtime.app import App
from runtime.codecs import examples
from runtime.codecs.tensor_proto import from_ndarray, to_ndarray
from runtime.codecs.tfserving import DEFAULT_SIGNATURE, signature_def
from runtime.endpoints import model_status_of
from runtime.errors import InvalidInput
from runtime.exchange import Exchange
from runtime.manifest import CLASSIFY, REGRESS
from runtime.protos import generated_module

log = logging.getLogger(__name__)

_predict = generated_module("tensorflow_serving.apis.predict_pb2")
_classification = generated_module("tensorflow_serving.apis.classification_pb2")
_regression = generated_module("tensorflow_serving.apis.regression_pb2")
_inference = generated_module("tensorflow_serving.apis.inference_pb2")
_metadata = generated_module("tensorflow_serving.apis.get_model_metadata_pb2")
_status = generated_module("tensorflow_serving.apis.get_model_status_pb2")
_management = generated_module("tensorflow_serving.apis.model_management_pb2")
_types = generated_module("tensorflow.core.framework.types_pb2")
_prediction_grpc = generated_module("tensorflow_serving.apis.prediction_service_pb2_grpc")
_model_grpc = generated_module("tensorflow_serving.apis.model_service_pb2_grpc")


def _version_keywords(spec: Any) -> dict[str, Any]:
    """ModelSpec -> the repository's (name, version, label) keywords."""
    choice = spec.WhichOneof("version_choice")
    return {
        "name": spec.name,
        "version": spec.version.value if choice == "version" else None,
        "label": spec.version_label if choice == "version_label" else None,
    }


def _spec_of(response_spec: Any, name: str, version: int, signature_name: str | None) -> None:
    response_spec.name = name
    response_spec.version.value = version
    if signature_name is not None:
        response_spec.signature_name = signature_name


class PredictionService(_prediction_grpc.PredictionServiceServicer, Service):  # type: ignore[name-defined]  # generated
    async def Predict(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await serve_call(self.app, context, "predict", lambda exchange: self._predict(request, exchange))

    async def Classify(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await serve_call(
            self.app, context, "classify", lambda exchange: self._examples(request, CLASSIFY, exchange)
        )

    async def Regress(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await serve_call(
            self.app, context, "regress", lambda exchange: self._examples(request, REGRESS, exchange)
        )

    async def MultiInference(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await serve_call(
            self.app, context, "multi_inference", lambda exchange: self._multi_inference(request, exchange)
        )

    async def GetModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work(exchange: Exchange) -> Any:
            return self._get_model_metadata(request)

        return await serve_call(self.app, context, "metadata", work)

    async def _predict(self, request: Any, exchange: Exchange) -> Any:
        key = request.model_spec.signature_name or DEFAULT_SIGNATURE
        inputs = {name: to_ndarray(tensor) for name, tensor in request.inputs.items()}
        with self.app.repository.hold(**_version_keywords(request.model_spec)) as handle:
            outputs = await self.app.execute(handle, key, inputs, exchange)
            version = handle.version
        wanted = list(request.output_filter) or list(outputs)
        unknown = sorted(set(wanted) - set(outputs))
        if unknown:
            raise InvalidInput(
                f"output_filter names outputs the signature does not have: {unknown}; it has: {sorted(outputs)}"
            )
        response = _predict.PredictResponse()
        _spec_of(response.model_spec, request.model_spec.name, version, key)
        for name in wanted:
            from_ndarray(outputs[name], response.outputs[name])
        return response

    async def _examples(self, request: Any, method: str, exchange: Exchange) -> Any:
        """Classify or Regress: one signature over the request's tf.Examples."""
        key = request.model_spec.signature_name or DEFAULT_SIGNATURE
        serialized = examples.from_input(request.input)
        with self.app.repository.hold(**_version_keywords(request.model_spec)) as handle:
            outputs = await self.app.run_examples(handle, key, method, serialized, exchange)
            version = handle.version
        response = _classification.ClassificationResponse() if method == CLASSIFY else _regression.RegressionResponse()
        _spec_of(response.model_spec, request.model_spec.name, version, key)
        _fill_result(response.result, outputs, method)
        return response

    async def _multi_inference(self, request: Any, exchange: Exchange) -> Any:
        """Several classify and regress signatures of one model version over the same examples,
        with TF Serving's rules: one model and version for all tasks, each signature once."""
        if not request.tasks:
            raise InvalidInput("MultiInferenceRequest must name at least one task")
        specs = [task.model_spec for task in request.tasks]
        if len({spec.name for spec in specs}) != 1:
            raise InvalidInput("all tasks of a MultiInferenceRequest must name the same model")
        if len({(spec.WhichOneof("version_choice"), spec.version.value, spec.version_label) for spec in specs}) != 1:
            raise InvalidInput("all tasks of a MultiInferenceRequest must name the same model version")
        keys = [spec.signature_name or DEFAULT_SIGNATURE for spec in specs]
        if len(set(keys)) != len(keys):
            raise InvalidInput("a signature may appear in only one task of a MultiInferenceRequest")
        methods = {CLASSIFY: CLASSIFY, REGRESS: REGRESS}
        for task in request.tasks:
            if task.method_name not in methods:
                raise InvalidInput(
                    f"unsupported method {task.method_name!r} in a MultiInferenceRequest task; "
                    f"supported: {CLASSIFY}, {REGRESS}"
                )
        serialized = examples.from_input(request.input)
        response = _inference.MultiInferenceResponse()
        with self.app.repository.hold(**_version_keywords(specs[0])) as handle:
            for task, key in zip(request.tasks, keys):
                outputs = await self.app.run_examples(handle, key, task.method_name, serialized, exchange)
                result = response.results.add()
                _spec_of(result.model_spec, task.model_spec.name, handle.version, key)
                _fill_result(
                    result.classification_result if task.method_name == CLASSIFY else result.regression_result,
                    outputs,
                    task.method_name,
                )
        return response

    def _get_model_metadata(self, request: Any) -> Any:
        fields = list(request.metadata_field)
        if not fields:
            raise InvalidInput("GetModelMetadataRequest must specify at least one metadata_field")
        unsupported = [field for field in fields if field != "signature_def"]
        if unsupported:
            raise InvalidInput(f"Metadata field {unsupported[0]} is not supported")
        with self.app.repository.hold(**_version_keywords(request.model_spec)) as handle:
            signatures = dict(handle.engine.signatures)
            version = handle.version
        response = _metadata.GetModelMetadataResponse()
        _spec_of(response.model_spec, request.model_spec.name, version, None)
        signature_map = json_format.ParseDict(
            {"signature_def": {key: signature_def(signature) for key, signature in signatures.items()}},
            _metadata.SignatureDefMap(),
        )
        response.metadata["signature_def"].Pack(signature_map)
        return response


def _fill_result(result: Any, outputs: dict, method: str) -> None:
    """A ClassificationResult or RegressionResult from a signature's outputs."""
    if method == REGRESS:
        for value in examples.regressions(outputs):
            result.regressions.add(value=value)
        return
    for row in examples.classifications(outputs):
        classes = result.classifications.add().classes
        for label, score in row:
            added = classes.add(label=label)
            if score is not None:
                added.score = score


class ModelService(_model_grpc.ModelServiceServicer):  # type: ignore[name-defined]  # generated
    def __init__(self, app: App):
        """Made at start-up: the roots a reload may name are fixed here, from the configuration before
        any reload (runtime.access.Reload)."""
        self.app = app
        repository = app.repository
        self.roots = app.auth.reload.roots(repository.config_of(name).base_path for name in repository.names())

    async def GetModelStatus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work(exchange: Exchange) -> Any:
            return self._get_model_status(request)

        return await serve_call(self.app, context, "status", work)

    async def HandleReloadConfigRequest(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work(exchange: Exchange) -> Any:
            from runtime.model_config import from_proto

            config = from_proto(request.config)
            self.app.auth.reload.check_base_paths((model.base_path for model in config.models), self.roots)
            await asyncio.get_running_loop().run_in_executor(None, self.app.repository.reload, config)
            log.info(
                "model configuration reloaded by %s: %s",
                exchange.tenant or "anyone (KILN_RELOAD=open)",
                ", ".join(model.name for model in config.models) or "no models",
            )
            return _management.ReloadConfigResponse()

        # Changing what every tenant is served is administration: an administrator's key, not a tenant's.
        return await serve_call(self.app, context, "reload_config", work, authenticate=self.app.auth.admin)

    def _get_model_status(self, request: Any) -> Any:
        status = model_status_of(self.app.repository, **_version_keywords(request.model_spec))
        return json_format.ParseDict(status, _status.GetModelStatusResponse())
