"""The gRPC server of `kiln serve --grpc-port`: TensorFlow Serving's services, the Open Inference
Protocol's, Kiln's Generation and grpc.health.v1, each request parsed inside its call, keys checked
before a message is read."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError

from handlers.grpc.call import text
from handlers.grpc.generation import GenerationService
from handlers.grpc.health import OPEN_METHODS as HEALTH_METHODS
from handlers.grpc.health import Health
from handlers.grpc.oip import InferenceService
from handlers.grpc.tfserving import ModelService, PredictionService
from runtime.app import App
from runtime.errors import KilnError, status_of
from runtime.exchange import Exchange
from runtime.protos import generated_module
from runtime.settings import Settings

OPEN_METHODS = frozenset({"/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady"})
ADMIN_METHODS = frozenset({"/tensorflow.serving.ModelService/HandleReloadConfigRequest"})  # Auth.admin, not tenant
SERVER_KEEPALIVE_MS = 60_000  # ping a client with calls open after this long without data, to find dead peers


def add_service(server: grpc.aio.Server, servicer: Any, module: Any, service: str) -> None:
    """Serve a servicer's methods, as the generated add_*_to_server would, except that each request
    is parsed inside the call: bytes that are not the request message then answer INVALID_ARGUMENT
    naming it, where grpc's own parsing would answer UNKNOWN."""
    descriptor = module.DESCRIPTOR.services_by_name[service]
    handlers = {}
    for method in descriptor.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)

        async def call(
            raw: bytes,
            context: grpc.aio.ServicerContext,
            behavior=getattr(servicer, method.name),  # noqa: B008 (bound per method)
            request_class=request_class,
        ) -> Any:
            try:
                request = request_class.FromString(raw)
            except DecodeError as e:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the request is not a valid {request_class.DESCRIPTOR.full_name}: {e}",
                )
            return await behavior(request, context)

        handler = (
            grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        )  # a streaming servicer writes to its context
        handlers[method.name] = handler(
            call, request_deserializer=None, response_serializer=response_class.SerializeToString
        )
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
            authenticate(text(details.invocation_metadata))
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

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    return kinds[handler.request_streaming, handler.response_streaming](refuse)


async def serve_grpc(app: App, port: int, host: str = "0.0.0.0", settings: Settings | None = None) -> grpc.aio.Server:
    """Start the gRPC server on host:port and return it (the caller stops it): TensorFlow
    Serving's services, the Open Inference Protocol's, Kiln's Generation and grpc.health.v1.Health.
    `settings`: the connection limits, as for REST (handlers.local; default: runtime.settings' defaults)."""
    settings = settings or Settings()
    options = [
        # A request is one message: the REST body limit bounds it, checked from its length prefix before
        # it is buffered. Answers are the server's own (a big batch's results): not capped, as TF Serving.
        ("grpc.max_receive_message_length", app.max_body_bytes),
        ("grpc.max_send_message_length", -1),
        # A connection with no call open is closed after the keep-alive timeout, longer than a balancer's
        # idle timeout, so that the balancer closes first (GOAWAY: clients reconnect, no call is lost).
        ("grpc.max_connection_idle_ms", int(settings.keepalive_timeout_seconds * 1000)),
        # A new connection must finish HTTP/2's handshake within the header timeout (grpc's default: 120 s).
        ("grpc.server_handshake_timeout_ms", int(settings.header_timeout_seconds * 1000)),
        # While calls are open, ping a silent client to find a dead one (grpc's default: after 2 hours).
        ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_MS),
    ]
    needs_key = app.auth.enabled or app.auth.reload.policy != "open"
    server = grpc.aio.server(
        options=options,
        interceptors=[Authenticate(app)] if needs_key else None,
        maximum_concurrent_rpcs=settings.max_connections or None,
    )
    add_service(
        server,
        PredictionService(app),
        generated_module("tensorflow_serving.apis.prediction_service_pb2"),
        "PredictionService",
    )
    add_service(
        server, ModelService(app), generated_module("tensorflow_serving.apis.model_service_pb2"), "ModelService"
    )
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
