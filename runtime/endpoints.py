"""The REST endpoints, each a route's answer (runtime.app's route table): TF Serving's model status,
metadata, predict, classify and regress, Kiln's :generate and model list, and the Open Inference
Protocol's server and model metadata, health, readiness, infer and repository index. Each decodes
its request with a codec, holds the model version it addresses, hands the model work to the core
(`Core.execute`) and encodes the answer; the core has counted, authenticated and checked it."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from urllib.parse import unquote

import orjson

from runtime import __version__
from runtime.codecs import examples, oip
from runtime.codecs.oip import default_signature, oip_signature
from runtime.codecs.tfserving import (
    DEFAULT_SIGNATURE,
    REPORTED_STATE,
    decode_predict,
    encode_predict,
    fast_predict,
    instances_text,
    model_status,
    read_predict,
    signature_def,
)
from runtime.core import Core
from runtime.errors import InvalidInput, KilnError, NotFound, status_of
from runtime.exchange import JSON, Exchange, Request, Response, error_body
from runtime.manifest import Signature
from runtime.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from runtime.repository import Repository, ServableHandle
from runtime.version_policy import State

log = logging.getLogger(__name__)
Parts = Mapping[str, str | None]  # a route's named parts of the path: name, version, label, verb


@dataclass(frozen=True)
class ModelSpec:
    """Which model version a request addresses."""

    name: str
    version: int | None = None
    label: str | None = None


async def metrics(core: Core, request: Request, exchange: Exchange, parts: Parts) -> Response:
    return Response(200, core.metrics.render(), {"Content-Type": METRICS_CONTENT_TYPE})


async def server_metadata(core: Core, request: Request, exchange: Exchange, parts: Parts) -> Response:
    return _json(oip.server_metadata(__version__))


async def live(core: Core, request: Request, exchange: Exchange, parts: Parts) -> Response:
    return _json({"live": True})


async def ready(core: Core, request: Request, exchange: Exchange, parts: Parts) -> Response:
    answer = core.ready()
    return _json({"ready": answer}, 200 if answer else 503)


async def model_ready(core: Core, request: Request, exchange: Exchange, parts: Parts) -> Response:
    with hold(core, _model_spec(parts), exchange) as handle:
        return _json({"name": handle.name, "ready": True})


async def model_metadata(core: Core, request: Request, exchange: Exchange, parts: Parts) -> Response:
    with hold(core, _model_spec(parts), exchange) as handle:
        versions = [v.version for v in core.repository.status(handle.name).versions if v.state is State.AVAILABLE]
        return _json(oip.metadata(handle.name, versions, default_signature(handle.engine)[1]))


async def infer(core: Core, request: Request, exchange: Exchange, parts: Parts) -> Response:
    target, headers = _model_spec(parts), request.headers
    header, binary = oip.infer_header(request.body, headers.get(oip.HEADER_LENGTH.lower()))
    parameters = header.get("parameters") or {}
    session, extra = None, {}
    with hold(core, target, exchange) as handle:
        key, signature = oip_signature(handle.engine, parameters)
        if signature.state:
            from runtime.sessions.predict import infer_in_session, visible
            from runtime.sessions.services import SESSION_HEADER, tenant_of

            decoded = oip.infer_request(header, binary, visible(signature))
            outputs, session = await infer_in_session(
                core,
                handle,
                key,
                signature,
                decoded.inputs,
                parameters,
                tenant_of(exchange.tenant, headers),
                exchange,
            )
            extra = {SESSION_HEADER: session}
        else:
            decoded = oip.infer_request(header, binary, signature)
            outputs = await core.execute(handle, key, decoded.inputs, exchange)
        body, header_length = oip.write_infer(
            handle.name, handle.version, outputs, decoded, None if session is None else {"sequence_id": session}
        )
    if header_length is None:
        return Response(200, body, {**JSON, **extra})
    # The binary tensor data extension: JSON, then the binary outputs (Triton's content type).
    return Response(
        200, body, {"Content-Type": "application/octet-stream", oip.HEADER_LENGTH: str(header_length), **extra}
    )


async def status(core: Core, request: Request, exchange: Exchange, parts: Parts) -> Response:
    target = _model_spec(parts)
    exchange.model = target.name if target.label is None or target.name in core.repository.names() else ""
    return _json(model_status_of(core.repository, target.name, target.version, target.label))


def model_status_of(repository: Repository, name: str, version: int | None, label: str | None) -> dict:
    """TF Serving's model status document (GetModelStatusResponse as JSON) for a model, one version
    or a label's: REST answers it, gRPC's GetModelStatus parses it into its message."""
    if label is not None:
        with repository.hold(name, version=version, label=label) as handle:
            version = handle.version
    return model_status(repository.status(name, version).versions)


def _served_models(core: Core) -> list[dict]:
    models = []
    for name in core.repository.names():
        try:
            versions = core.repository.status(name).versions
        except NotFound:  # configured, nothing found in its store yet
            versions = []
        labels = core.repository.config_of(name).version_labels
        models.append(
            {
                "name": name,
                "versions": [{"version": str(v.version), "state": REPORTED_STATE[v.state]} for v in versions],
                "labels": {label: str(number) for label, number in labels.items()},
            }
        )
    return models


async def models(core: Core, request: Request, exchange: Exchange, parts: Parts) -> Response:
    return _json({"models": _served_models(core)})


async def repository_index(core: Core, request: Request, exchange: Exchange, parts: Parts) -> Response:
    index = [
        {
            "name": model["name"],
            "version": v["version"],
            "state": "READY" if v["state"] == "AVAILABLE" else "UNAVAILABLE",
            "reason": "",
        }
        for model in _served_models(core)
        for v in model["versions"]
    ]
    return Response(200, orjson.dumps(index))


async def metadata(core: Core, request: Request, exchange: Exchange, parts: Parts) -> Response:
    with hold(core, _model_spec(parts), exchange) as handle:
        signatures = {key: signature_def(sig) for key, sig in handle.engine.signatures.items()}
        return _json(
            {
                "model_spec": {"name": handle.name, "signature_name": "", "version": str(handle.version)},
                "metadata": {"signature_def": {"signature_def": signatures}},
            }
        )


async def predict(core: Core, request: Request, exchange: Exchange, parts: Parts) -> Response:
    target, body = _model_spec(parts), request.body
    instances = instances_text(body)  # perhaps rows of numbers only: see fast_predict
    if instances is None:
        signature_name, parsed = read_predict(body)
    with hold(core, target, exchange) as handle:
        default = handle.engine.signatures.get(DEFAULT_SIGNATURE)
        decoded = None
        if instances is not None and default is not None and not default.state:
            decoded = fast_predict(instances, default)
        if decoded is None:
            if instances is not None:
                signature_name, parsed = read_predict(body)
            signature = handle.engine.signature(signature_name)
            if signature.state:
                return await _predict_in_session(core, handle, signature_name, signature, parsed, request, exchange)
            decoded = decode_predict(signature_name, parsed, signature)
        outputs = await core.execute(handle, decoded.signature_name, decoded.inputs, exchange)
    return Response(200, encode_predict(outputs, decoded.row_format))


async def _predict_in_session(
    core: Core,
    handle: ServableHandle,
    key: str,
    signature: Signature,
    parsed: dict,
    request: Request,
    exchange: Exchange,
) -> Response:
    from runtime.sessions.predict import predict_in_session
    from runtime.sessions.services import SESSION_HEADER, tenant_of

    outputs, row_format, session = await predict_in_session(
        core, handle, key, signature, parsed, tenant_of(exchange.tenant, request.headers), exchange
    )
    body = encode_predict(outputs, row_format)  # an object: the session joins it as its last key
    return Response(200, body[:-1] + b',"session":' + orjson.dumps(session) + b"}", {**JSON, SESSION_HEADER: session})


async def classify_or_regress(core: Core, request: Request, exchange: Exchange, parts: Parts) -> Response:
    method = examples.METHODS[str(parts["verb"])]
    signature_name, rows = examples.read_examples(request.body)
    serialized = examples.serialize(rows)
    with hold(core, _model_spec(parts), exchange) as handle:
        outputs = await core.run_examples(handle, signature_name, method, serialized, exchange)
    return _json(examples.encode_results(outputs, method))


async def unknown_verb(core: Core, request: Request, exchange: Exchange, parts: Parts) -> Response:
    raise InvalidInput(
        f"unknown method ':{parts['verb']}'; this server answers :predict, :classify, :regress and :generate"
    )


async def generate(core: Core, request: Request, exchange: Exchange, parts: Parts) -> Response:
    from runtime.sessions import generate as generation
    from runtime.sessions.services import SESSION_HEADER, tenant_of

    target = _model_spec(parts)
    generate_request = generation.read_generate(request.body)
    tenant = tenant_of(exchange.tenant, request.headers)
    session = generation.session_of(core, tenant, generate_request)
    if not generate_request.stream:
        with hold(core, target, exchange) as handle:
            answer = await generation.generate(core, handle, generate_request, tenant, session, exchange)
        return Response(200, orjson.dumps(answer), {**JSON, SESSION_HEADER: session})
    with hold(core, target, exchange):  # an unknown model or version answers 404 before the stream
        pass

    async def stream() -> AsyncGenerator[bytes, None]:
        """Server-sent events; an error once the stream has begun is its last event."""
        try:
            with hold(core, target, exchange) as handle:
                async for event in generation.events(core, handle, generate_request, tenant, session, exchange):
                    yield b"data: " + orjson.dumps(event) + b"\n\n"
        except KilnError as e:
            yield b"event: error\ndata: " + error_body(e, status=status_of(e)[0]) + b"\n\n"
        except Exception:
            log.exception("internal error streaming %s", request.path)
            yield b'event: error\ndata: {"error": "internal error", "status": 500}\n\n'

    return Response(
        200,
        b"",
        {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", SESSION_HEADER: session},
        stream=stream(),
    )


def hold(core: Core, target: ModelSpec, exchange: Exchange) -> AbstractContextManager[ServableHandle]:
    """The version the request addresses, held while it is served; the request counted under its
    model's name once that names a served model."""
    exchange.model = target.name if target.name in core.repository.names() else ""
    return core.repository.hold(target.name, version=target.version, label=target.label)


def _model_spec(parts: Parts) -> ModelSpec:
    version, label, name = parts["version"], parts.get("label"), parts["name"]
    assert name is not None  # every model route's path names it
    return ModelSpec(
        unquote(name),
        int(version) if version is not None else None,
        unquote(label) if label is not None else None,
    )


def _json(body: dict, status: int = 200) -> Response:
    return Response(status, orjson.dumps(body))
