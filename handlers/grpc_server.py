"""TensorFlow Serving's gRPC API (PredictionService, ModelService) for `kiln serve --grpc-port`.

The servicers only adapt: they resolve the ModelSpec with the core's repository, turn TensorProtos
into arrays with runtime.codecs.tensor_proto, run the model in the event loop's thread pool (the
loop stays free for other calls, REST included), and map a KilnError to its gRPC code through
runtime.errors.status_of, as every other handler does. The messages are Kiln's own generated ones,
wire-identical to tensorflow-serving-api's; grpc is imported here and nowhere else in the runtime.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from runtime.app import DTYPE_ENUM, REPORTED_STATE, App
from runtime.codecs.tensor_proto import from_ndarray, to_ndarray
from runtime.errors import InvalidInput, KilnError, status_of
from runtime.manifest import Signature, TensorSpec
from runtime.protos import generated_module

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_SIGNATURE = "serving_default"  # TF Serving's kDefaultServingSignatureDefKey

_predict = generated_module("tensorflow_serving.apis.predict_pb2")
_metadata = generated_module("tensorflow_serving.apis.get_model_metadata_pb2")
_status = generated_module("tensorflow_serving.apis.get_model_status_pb2")
_management = generated_module("tensorflow_serving.apis.model_management_pb2")
_types = generated_module("tensorflow.core.framework.types_pb2")
_prediction_grpc = generated_module("tensorflow_serving.apis.prediction_service_pb2_grpc")
_model_grpc = generated_module("tensorflow_serving.apis.model_service_pb2_grpc")


async def _call(context: grpc.aio.ServicerContext, work: Callable[[], T]) -> T:
    """Run blocking model work in the thread pool within the client's deadline; a KilnError (or a
    bug) ends the call with its gRPC code."""
    remaining = context.time_remaining()
    future = asyncio.get_running_loop().run_in_executor(None, work)
    try:
        return await asyncio.wait_for(future, remaining)
    except asyncio.TimeoutError:
        error: tuple[grpc.StatusCode, str] = (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    except KilnError as e:
        error = (grpc.StatusCode[status_of(e)[1]], str(e))
    except Exception:  # a bug: the client gets INTERNAL, the log gets the traceback
        log.exception("internal error serving a gRPC call")
        error = (grpc.StatusCode.INTERNAL, "internal error")
    await context.abort(*error)


def _target(spec: Any) -> dict[str, Any]:
    """ModelSpec -> the repository's (name, version, label) keywords."""
    choice = spec.WhichOneof("version_choice")
    return {"name": spec.name,
            "version": spec.version.value if choice == "version" else None,
            "label": spec.version_label if choice == "version_label" else None}


def _spec_of(response_spec: Any, name: str, version: int, signature_name: str | None) -> None:
    response_spec.name = name
    response_spec.version.value = version
    if signature_name is not None:
        response_spec.signature_name = signature_name


class PredictionService(_prediction_grpc.PredictionServiceServicer):
    def __init__(self, app: App):
        self.app = app

    async def Predict(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await _call(context, lambda: self._predict(request))

    async def GetModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await _call(context, lambda: self._get_model_metadata(request))

    def _predict(self, request: Any) -> Any:
        key = request.model_spec.signature_name or DEFAULT_SIGNATURE
        inputs = {name: to_ndarray(tensor) for name, tensor in request.inputs.items()}
        with self.app.repository.handle(**_target(request.model_spec)) as handle:
            outputs = handle.engine.run(key, inputs)
            version = handle.version
        wanted = list(request.output_filter) or list(outputs)
        unknown = sorted(set(wanted) - set(outputs))
        if unknown:
            raise InvalidInput(f"output_filter names outputs the signature does not have: {unknown}; "
                               f"it has: {sorted(outputs)}")
        response = _predict.PredictResponse()
        _spec_of(response.model_spec, request.model_spec.name, version, key)
        for name in wanted:
            from_ndarray(outputs[name], response.outputs[name])
        return response

    def _get_model_metadata(self, request: Any) -> Any:
        fields = list(request.metadata_field)
        if not fields:
            raise InvalidInput("GetModelMetadataRequest must specify at least one metadata_field")
        unsupported = [field for field in fields if field != "signature_def"]
        if unsupported:
            raise InvalidInput(f"Metadata field {unsupported[0]} is not supported")
        with self.app.repository.handle(**_target(request.model_spec)) as handle:
            signatures = dict(handle.engine.signatures)
            version = handle.version
        response = _metadata.GetModelMetadataResponse()
        _spec_of(response.model_spec, request.model_spec.name, version, None)
        signature_map = _metadata.SignatureDefMap()
        for key, signature in signatures.items():
            _signature_def(signature, signature_map.signature_def[key])
        response.metadata["signature_def"].Pack(signature_map)
        return response


def _signature_def(signature: Signature, message: Any) -> None:
    message.method_name = signature.method
    for specs, infos in ((signature.inputs, message.inputs), (signature.outputs, message.outputs)):
        for spec in specs:
            _tensor_info(spec, infos[spec.name])


def _tensor_info(spec: TensorSpec, info: Any) -> None:
    info.name = spec.name
    info.dtype = _types.DataType.Value(DTYPE_ENUM.get(spec.dtype, "DT_INVALID"))
    for size in spec.shape:
        info.tensor_shape.dim.add(size=-1 if size is None else size)


class ModelService(_model_grpc.ModelServiceServicer):
    def __init__(self, app: App):
        self.app = app

    async def GetModelStatus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await _call(context, lambda: self._get_model_status(request))

    async def HandleReloadConfigRequest(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await _call(context, lambda: self._reload(request))

    def _get_model_status(self, request: Any) -> Any:
        target = _target(request.model_spec)
        version = target["version"]
        if target["label"] is not None:
            with self.app.repository.handle(**target) as handle:
                version = handle.version
        status = self.app.repository.status(target["name"], version)
        response = _status.GetModelStatusResponse()
        for v in status.versions:
            response.model_version_status.add(
                version=v.version, state=_status.ModelVersionStatus.State.Value(REPORTED_STATE[v.state]),
                status={"error_code": 2 if v.error else 0, "error_message": v.error})  # UNKNOWN or OK
        return response

    def _reload(self, request: Any) -> Any:
        from runtime.model_config import from_proto

        self.app.repository.reload(from_proto(request.config))
        return _management.ReloadConfigResponse()


async def serve_grpc(app: App, port: int, host: str = "0.0.0.0") -> grpc.aio.Server:
    """Start the gRPC server on host:port and return it (the caller stops it)."""
    # As TF Serving: no cap on message size (a big batch is one message).
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", -1),
                                      ("grpc.max_send_message_length", -1)])
    _prediction_grpc.add_PredictionServiceServicer_to_server(PredictionService(app), server)
    _model_grpc.add_ModelServiceServicer_to_server(ModelService(app), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen for gRPC on {address}")
    await server.start()
    return server
