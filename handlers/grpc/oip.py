"""The Open Inference Protocol over gRPC (KServe v2's `inference.GRPCInferenceService`) for
`kiln serve --grpc-port`, beside TensorFlow Serving's services on the same server.

Served: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelInfer; Triton's
other methods in the same service answer UNIMPLEMENTED. The servicer only adapts, as
handlers/grpc/tfserving.py does: runtime.codecs.oip_grpc turns messages into arrays and back,
`serve_call` wraps every call (request id, authentication, the client's deadline, errors mapped by
runtime.errors.status_of, metrics, the access log), and model work goes to `App.execute`. Answers
agree with the REST routes (`/v2/...` in runtime.app): the same readiness, the same metadata
documents, the same signature (`oip_signature`: the signature_name parameter's, else serving_default or the
only one), and a stateful signature answers in the session its sequence_id parameter names
(runtime.sessions.predict), the session's id coming back as the response's sequence_id parameter.

The messages are generated from Kiln's copy of Triton's grpc_service.proto, byte-identical to the
one tritonclient registers, so a process may import both (tests/test_protos.py checks it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import grpc

from handlers.grpc.call import Service, serve_call, text_metadata
from runtime import __version__
from runtime.codecs import oip_grpc
from runtime.codecs.oip import default_signature, oip_signature
from runtime.errors import NotFound
from runtime.exchange import Exchange
from runtime.protos import generated_module
from runtime.repository import ServableHandle
from runtime.version_policy import State

_service = generated_module("grpc_service_pb2")
_service_grpc = generated_module("grpc_service_pb2_grpc")


class InferenceService(_service_grpc.GRPCInferenceServiceServicer, Service):  # type: ignore[name-defined]  # generated
    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await serve_call(self.app, context, "health", partial(self._live, request))

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await serve_call(self.app, context, "health", partial(self._ready, request))

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await serve_call(self.app, context, "ready", partial(self._model_ready, request))

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await serve_call(self.app, context, "server_metadata", partial(self._server_metadata, request))

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await serve_call(self.app, context, "metadata", partial(self._model_metadata, request))

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await serve_call(self.app, context, "infer", partial(self._infer, request, context))

    async def _live(self, request: Any, exchange: Exchange) -> Any:
        return _service.ServerLiveResponse(live=True)

    async def _ready(self, request: Any, exchange: Exchange) -> Any:
        return _service.ServerReadyResponse(ready=self.app.ready())

    async def _model_ready(self, request: Any, exchange: Exchange) -> Any:
        """Ready when the version asked for (or any) can take requests; a model or version that is
        not served is not ready (REST answers it 404; tritonclient reads both as False)."""
        try:
            with self._hold(request.name, request.version, exchange):
                return _service.ModelReadyResponse(ready=True)
        except NotFound:
            return _service.ModelReadyResponse(ready=False)

    async def _server_metadata(self, request: Any, exchange: Exchange) -> Any:
        return oip_grpc.server_metadata(__version__)

    async def _model_metadata(self, request: Any, exchange: Exchange) -> Any:
        with self._hold(request.name, request.version, exchange) as handle:
            versions = [
                v.version for v in self.app.repository.status(handle.name).versions if v.state is State.AVAILABLE
            ]
            return oip_grpc.model_metadata(handle.name, versions, default_signature(handle.engine)[1])

    async def _infer(self, request: Any, context: grpc.aio.ServicerContext, exchange: Exchange) -> Any:
        """As App._infer: a stateful signature answers in the session of the sequence_id parameter."""
        parameters = oip_grpc.request_parameters(request)
        with self._hold(request.model_name, request.model_version, exchange) as handle:
            key, signature = oip_signature(handle.engine, parameters)
            if not signature.state:
                inputs, names = oip_grpc.decode_infer(request, signature)
                outputs = await self.app.execute(handle, key, inputs, exchange)
                return oip_grpc.encode_infer(handle.name, handle.version, outputs, names, request.id)
            from runtime.sessions.predict import infer_in_session, visible
            from runtime.sessions.services import tenant_of

            inputs, names = oip_grpc.decode_infer(request, visible(signature))
            outputs, session = await infer_in_session(
                self.app,
                handle,
                key,
                signature,
                inputs,
                parameters,
                tenant_of(exchange.tenant, text_metadata(context)),
                exchange,
            )
            response = oip_grpc.encode_infer(handle.name, handle.version, outputs, names, request.id)
            response.parameters["sequence_id"].string_param = session
            return response

    @contextmanager
    def _hold(self, name: str, version: str, exchange: Exchange) -> Iterator[ServableHandle]:
        """The version a call names ("": the newest available), held while the call uses it."""
        with self.app.repository.hold(name, version=oip_grpc.version(version)) as handle:
            exchange.model, exchange.version = handle.name, str(handle.version)
            yield handle
