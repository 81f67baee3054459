"""Kiln's gRPC Generation service (runtime/protos/kiln/generation.proto): POST :generate's gRPC form,
each generated token written to the stream as it is made. It adapts as handlers/grpc/tfserving.py does
(serve_call around the call, the repository for the version, runtime.sessions.generate for the work)."""

from __future__ import annotations

from typing import Any

import grpc

from handlers.grpc.call import Service, serve_call, text_metadata
from runtime.exchange import Exchange
from runtime.protos import generated_module
from runtime.sessions import generate as generation
from runtime.sessions.services import tenant_of

_messages = generated_module("kiln.generation_pb2")
_service = generated_module("kiln.generation_pb2_grpc")


class GenerationService(_service.GenerationServicer, Service):  # type: ignore[name-defined]  # generated
    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        async def work(exchange: Exchange) -> None:
            generate_request = _request(request)
            tenant = tenant_of(exchange.tenant, text_metadata(context))
            session = generation.session_of(self.app, tenant, generate_request)
            version = request.model_version or None
            with self.app.repository.hold(request.model_name, version=version) as handle:
                async for event in generation.events(self.app, handle, generate_request, tenant, session, exchange):
                    await context.write(_event(event))

        await serve_call(self.app, context, "generate", work)


def _request(message: Any) -> generation.GenerateRequest:
    """The message as the REST body would say it, checked by the same rules."""
    import orjson

    body: dict[str, Any] = {"max_tokens": message.max_tokens, "temperature": message.temperature}
    if message.WhichOneof("input") == "tokens":
        body["tokens"] = list(message.tokens.ids)
    else:
        body["prompt"] = message.prompt
    if message.has_seed:
        body["seed"] = message.seed
    if message.session:
        body["session"] = message.session
    return generation.read_generate(orjson.dumps(body))


def _event(event: dict) -> Any:
    if "token" in event:
        return _messages.GenerateEvent(
            token=_messages.Token(id=event["token"], text=bytes([event["token"]]), logprob=event["logprob"])
        )
    return _messages.GenerateEvent(done=_messages.Done(session=event["session"], tokens=event["tokens"]))
