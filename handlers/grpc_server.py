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
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError

from handlers.grpc_health import OPEN_METHODS as HEALTH_METHODS
from handlers.grpc_health import Health
from runtime import logs, tracing
from runtime.app import DTYPE_ENUM, REPORTED_STATE, App, Exchange
from runtime.codecs import examples
from runtime.codecs.tensor_proto import from_ndarray, to_ndarray
from runtime.errors import InvalidInput, KilnError, status_of
from runtime.manifest import CLASSIFY, REGRESS, Signature, TensorSpec
from runtime.protos import generated_module
from runtime.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_SIGNATURE = "serving_default"  # TF Serving's kDefaultServingSignatureDefKey
OPEN_APIS = frozenset({"health"})  # as REST health: probes need no key
OPEN_METHODS = frozenset({"/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady"})
ADMIN_METHODS = frozenset({"/tensorflow.serving.ModelService/HandleReloadConfigRequest"})  # Auth.admin, not tenant
SERVER_KEEPALIVE_MS = 60_000  # ping a client with calls open after this long without data, to find dead peers

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


def text_metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """The call's text metadata, by lower-case key (the headers of gRPC)."""
    return _text(context.invocation_metadata())


def _text(metadata: Any) -> dict[str, str]:
    return {key.lower(): value for key, value in metadata or () if isinstance(value, str)}


async def serve_call(app: App, context: grpc.aio.ServicerContext, api: str,
                     work: Callable[[Exchange], Awaitable[T]],
                     authenticate: Callable[[Mapping[str, str]], str | None] | None = None) -> T:
    """Serve one call: what every servicer method does around its own work. `authenticate`: who the
    metadata names (default: the tenant of its API key; reload asks for an administrator instead)."""
    exchange = Exchange("grpc", api=api)
    metadata = text_metadata(context)
    token = logs.request_id.set(logs.new_request_id(metadata.get("x-request-id")))
    trace = tracing.start(metadata, f"gRPC {api}")
    context.set_trailing_metadata((("x-request-id", logs.request_id.get()), *trace.headers.items()))
    code, message = "OK", ""
    try:
        if api not in OPEN_APIS:
            exchange.tenant = (authenticate or app.auth.tenant)(metadata)
        remaining = context.time_remaining()
        if remaining is not None:
            exchange.deadline = time.monotonic() + remaining
        return await work(exchange)
    except KilnError as e:
        code, message = status_of(e)[1], str(e)
    except asyncio.CancelledError:  # grpc ended the call: its deadline passed, or the client left
        passed = exchange.deadline is not None and time.monotonic() >= exchange.deadline
        code = "DEADLINE_EXCEEDED" if passed else "CANCELLED"
        raise
    except Exception:  # a bug: the client gets INTERNAL, the log gets the traceback
        log.exception("internal error serving gRPC %s", api)
        code, message = "INTERNAL", "internal error"
    finally:
        app.finished(exchange, code, f"gRPC {api}")
        trace.end(exchange)
        logs.request_id.reset(token)
    await context.abort(grpc.StatusCode[code], message)


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
        return await serve_call(self.app, context, "predict", lambda exchange: self._predict(request, exchange))

    async def Classify(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await serve_call(self.app, context, "classify",
                                lambda exchange: self._examples(request, CLASSIFY, exchange))

    async def Regress(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await serve_call(self.app, context, "regress",
                                lambda exchange: self._examples(request, REGRESS, exchange))

    async def MultiInference(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await serve_call(self.app, context, "multi_inference",
                                lambda exchange: self._multi_inference(request, exchange))

    async def GetModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work(exchange: Exchange) -> Any:
            return self._get_model_metadata(request)

        return await serve_call(self.app, context, "metadata", work)

    async def _predict(self, request: Any, exchange: Exchange) -> Any:
        key = request.model_spec.signature_name or DEFAULT_SIGNATURE
        inputs = {name: to_ndarray(tensor) for name, tensor in request.inputs.items()}
        with self.app.repository.handle(**_target(request.model_spec)) as handle:
            outputs = await self.app.execute(handle, key, inputs, exchange)
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

    async def _examples(self, request: Any, method: str, exchange: Exchange) -> Any:
        """Classify or Regress: one signature over the request's tf.Examples."""
        key = request.model_spec.signature_name or DEFAULT_SIGNATURE
        serialized = examples.from_input(request.input)
        with self.app.repository.handle(**_target(request.model_spec)) as handle:
            outputs = await self.app.run_examples(handle, key, method, serialized, exchange)
            version = handle.version
        response = (_classification.ClassificationResponse() if method == CLASSIFY
                    else _regression.RegressionResponse())
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
                raise InvalidInput(f"unsupported method {task.method_name!r} in a MultiInferenceRequest task; "
                                   f"supported: {CLASSIFY}, {REGRESS}")
        serialized = examples.from_input(request.input)
        response = _inference.MultiInferenceResponse()
        with self.app.repository.handle(**_target(specs[0])) as handle:
            for task, key in zip(request.tasks, keys):
                outputs = await self.app.run_examples(handle, key, task.method_name, serialized, exchange)
                result = response.results.add()
                _spec_of(result.model_spec, task.model_spec.name, handle.version, key)
                _fill_result(result.classification_result if task.method_name == CLASSIFY
                             else result.regression_result, outputs, task.method_name)
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


def _signature_def(signature: Signature, message: Any) -> None:
    message.method_name = signature.method
    for specs, infos in ((signature.inputs, message.inputs), (signature.outputs, message.outputs)):
        for spec in specs:
            _tensor_info(spec, infos[spec.name])


def _tensor_info(spec: TensorSpec, info: Any) -> None:
    info.name = spec.name
    info.dtype = _types.DataType.Value(DTYPE_ENUM.get(spec.dtype, "DT_INVALID"))
    if spec.shape is None:
        info.tensor_shape.unknown_rank = True
    for size in spec.shape or ():
        info.tensor_shape.dim.add(size=-1 if size is None else size)


class ModelService(_model_grpc.ModelServiceServicer):
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
            log.info("model configuration reloaded by %s: %s", exchange.tenant or "anyone (KILN_RELOAD=open)",
                     ", ".join(model.name for model in config.models) or "no models")
            return _management.ReloadConfigResponse()

        # Changing what every tenant is served is administration: an administrator's key, not a tenant's.
        return await serve_call(self.app, context, "reload_config", work, authenticate=self.app.auth.admin)

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


def add_service(server: grpc.aio.Server, servicer: Any, module: Any, service: str) -> None:
    """Serve a servicer's methods, as the generated add_*_to_server would, except that each request
    is parsed inside the call: bytes that are not the request message then answer INVALID_ARGUMENT
    naming it, where grpc's own parsing would answer UNKNOWN."""
    descriptor = module.DESCRIPTOR.services_by_name[service]
    handlers = {}
    for method in descriptor.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)

        async def call(raw: bytes, context: grpc.aio.ServicerContext, behavior=getattr(servicer, method.name),
                       request_class=request_class) -> Any:
            try:
                request = request_class.FromString(raw)
            except DecodeError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"the request is not a valid {request_class.DESCRIPTOR.full_name}: {e}")
            return await behavior(request, context)

        handler = grpc.unary_stream_rpc_method_handler if method.server_streaming else \
            grpc.unary_unary_rpc_method_handler  # a streaming servicer writes to its context
        handlers[method.name] = handler(call, request_deserializer=None,
                                        response_serializer=response_class.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(descriptor.full_name, handlers),))


class Authenticate(grpc.aio.ServerInterceptor):
    """Refuses a call whose metadata has no valid key before its message is read or parsed
    (UNAUTHENTICATED, PERMISSION_DENIED), with the app's Auth, as serve_call then checks it: a
    tenant's key, an administrator's for reload; health stays open. Installed only when some call
    needs a key."""

    def __init__(self, app: App):
        self.app = app

    async def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        if details.method in OPEN_METHODS or details.method in HEALTH_METHODS:
            return await continuation(details)
        authenticate = self.app.auth.admin if details.method in ADMIN_METHODS else self.app.auth.tenant
        try:
            authenticate(_text(details.invocation_metadata))
        except KilnError as e:
            handler = await continuation(details)
            if handler is None:  # no such method: grpc answers UNIMPLEMENTED
                return None
            code = status_of(e)[1]
            self.app.finished(Exchange("grpc"), code, f"gRPC {details.method}")
            return _refusal(handler, grpc.StatusCode[code], str(e))
        return await continuation(details)


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with `code` and reads nothing."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return kinds[handler.request_streaming, handler.response_streaming](refuse)


async def serve_grpc(app: App, port: int, host: str = "0.0.0.0", settings: Settings | None = None) -> grpc.aio.Server:
    """Start the gRPC server on host:port and return it (the caller stops it): TensorFlow
    Serving's services, the Open Inference Protocol's, Kiln's Generation and grpc.health.v1.Health.
    `settings`: the connection limits, as for REST (handlers.local; default: runtime.settings' defaults)."""
    settings = settings or Settings()
    options = [
        # A request is one message: the REST body limit bounds it, checked from its length prefix before
        # it is buffered. Answers are the server's own (a big batch's results): not capped, as TF Serving.
        ("grpc.max_receive_message_length", app.max_body_bytes), ("grpc.max_send_message_length", -1),
        # A connection with no call open is closed after the keep-alive timeout, longer than a balancer's
        # idle timeout, so that the balancer closes first (GOAWAY: clients reconnect, no call is lost).
        ("grpc.max_connection_idle_ms", int(settings.keepalive_timeout_seconds * 1000)),
        # A new connection must finish HTTP/2's handshake within the header timeout (grpc's default: 120 s).
        ("grpc.server_handshake_timeout_ms", int(settings.header_timeout_seconds * 1000)),
        # While calls are open, ping a silent client to find a dead one (grpc's default: after 2 hours).
        ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_MS)]
    needs_key = app.auth.enabled or app.auth.reload.policy != "open"
    server = grpc.aio.server(options=options, interceptors=[Authenticate(app)] if needs_key else None,
                             maximum_concurrent_rpcs=settings.max_connections or None)
    add_service(server, PredictionService(app), generated_module("tensorflow_serving.apis.prediction_service_pb2"),
                "PredictionService")
    add_service(server, ModelService(app), generated_module("tensorflow_serving.apis.model_service_pb2"),
                "ModelService")
    from handlers.generation_grpc import GenerationService  # they import serve_call from here
    from handlers.oip_grpc import InferenceService

    add_service(server, InferenceService(app), generated_module("grpc_service_pb2"), "GRPCInferenceService")
    add_service(server, GenerationService(app), generated_module("kiln.generation_pb2"), "Generation")
    health = Health(app)
    health.add_to(server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen for gRPC on {address}")
    await server.start()
    await health.start()
    stop = server.stop

    async def stop_after_health(grace: float | None) -> None:  # probes hear NOT_SERVING while calls drain
        await health.stop()
        await stop(grace)

    server.stop = stop_after_health
    return server
