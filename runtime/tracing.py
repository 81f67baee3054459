"""Tracing: an OpenTelemetry span per request (W3C `traceparent` in and out, over REST and gRPC), and
the trace fields of structured log lines (Cloud Logging's `logging.googleapis.com/trace`).

Configured by the standard OTEL_* environment, read once at start-up (`configure`): spans are made
and exported when an exporter is asked for (OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT set, or OTEL_TRACES_EXPORTER naming `otlp` or `console`), and not
when OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none. OTLP's protocol is
OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL (`http/protobuf`, the specification's default, or `grpc`); the
exporters read their own endpoint, headers, timeout and compression variables, the SDK its sampler
(OTEL_TRACES_SAMPLER), batching (OTEL_BSP_*), OTEL_SERVICE_NAME (default: Cloud Run's K_SERVICE, else
"kiln") and OTEL_RESOURCE_ATTRIBUTES. The SDK is the `otel` extra, imported only then.

Otherwise nothing is imported and a request costs looking up two headers: a caller's trace context
(`traceparent`, or Cloud Run's `X-Cloud-Trace-Context`) is kept only so that the lines logged while
serving it carry it. With a Google Cloud project known (GOOGLE_CLOUD_PROJECT, or on Cloud Run the
metadata server's project id) those are Cloud Logging's fields, which put the lines under their
request in the Logs Explorer and Cloud Trace; elsewhere `trace_id`, `span_id`, `trace_sampled`.
Lambda's traces are X-Ray's (Powertools' Tracer, handlers.aws_lambda).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from typing import Any, NamedTuple

log = logging.getLogger(__name__)
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
CLOUD_TRACE = re.compile(r"^([0-9a-fA-F]{32})/(\d{1,20})(?:;o=([01]))?$")
METADATA_PROJECT = "/computeMetadata/v1/project/project-id"
GRPC_ERRORS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"})


class TraceIds(NamedTuple):
    """What a log line says about the trace it belongs to."""

    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    sampled: bool


current: ContextVar[TraceIds | None] = ContextVar("kiln_trace", default=None)
_server_span: ContextVar[Any] = ContextVar("kiln_server_span", default=None)
_tracer: Any = None  # an opentelemetry Tracer while spans are exported
_project: str | None = None


# Start-up -------------------------------------------------------------------------------------------


def configure(environ: Mapping[str, str] = os.environ) -> None:
    """Read the OTEL_* environment and the Google Cloud project once, as the server starts (in each
    worker process: the exporter's thread does not survive a fork). As OpenTelemetry's SDKs do, an
    OTEL_* value Kiln cannot honour (an unknown exporter, the SDK not installed) is logged, naming
    the variable, and the server runs without spans rather than not at all."""
    global _tracer, _project
    _project = environ.get("GOOGLE_CLOUD_PROJECT") or (_metadata_project(environ) if _on_cloud_run(environ) else None)
    try:
        exporters = _exporters(environ)
        _tracer = _sdk_tracer(exporters, environ) if exporters else None
    except ValueError as e:
        log.error("no traces: %s", e)
        _tracer = None


def enabled() -> bool:
    return _tracer is not None


def _exporters(environ: Mapping[str, str]) -> list[str]:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = [name.strip().lower() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if name.strip()]
    if not named:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return ["otlp"] if endpoint else []
    unknown = sorted(set(named) - {"otlp", "console", "none"})
    if unknown:
        raise ValueError(
            f"OTEL_TRACES_EXPORTER={environ['OTEL_TRACES_EXPORTER']!r}: Kiln exports to otlp, "
            f"console or none, not {', '.join(unknown)}"
        )
    return [name for name in named if name != "none"]


def _sdk_tracer(exporters: list[str], environ: Mapping[str, str]) -> Any:
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as e:
        raise ValueError(
            f"the OTEL_* environment asks for traces, but OpenTelemetry's SDK is not installed "
            f"(pip install 'kiln[otel]'): {e}"
        ) from None
    named = environ.get("OTEL_SERVICE_NAME") or "service.name=" in environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    resource = Resource.create({} if named else {"service.name": environ.get("K_SERVICE") or "kiln"})
    provider = TracerProvider(resource=resource)  # its sampler from OTEL_TRACES_SAMPLER; flushed at exit
    for name in exporters:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, environ)))
    trace.set_tracer_provider(provider)
    from runtime import __version__

    return provider.get_tracer("kiln", __version__)


def _exporter(name: str, environ: Mapping[str, str]) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    variable = next(
        (v for v in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL") if environ.get(v)), None
    )
    protocol = environ[variable].strip() if variable else "http/protobuf"
    try:
        exporter: Any
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as exporter
        elif protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as exporter
        else:
            raise ValueError(f"{variable}={protocol!r}: Kiln's OTLP exporters speak grpc and http/protobuf")
    except ImportError as e:
        raise ValueError(f"OTLP over {protocol} needs its exporter (pip install 'kiln[otel]'): {e}") from None
    return exporter()


def _on_cloud_run(environ: Mapping[str, str]) -> bool:
    return bool(environ.get("K_SERVICE") or environ.get("CLOUD_RUN_JOB"))


def _metadata_project(environ: Mapping[str, str]) -> str | None:
    """The project id from the metadata server (GCE_METADATA_HOST, as google-auth reads it, or the
    server every Cloud Run instance has); None, with a warning, when it does not answer."""
    import urllib.request

    host = environ.get("GCE_METADATA_HOST") or "metadata.google.internal"
    request = urllib.request.Request(f"http://{host}{METADATA_PROJECT}", headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=2) as answer:
            return answer.read().decode().strip() or None
    except OSError as e:
        log.warning(
            "no Google Cloud project for log correlation (set GOOGLE_CLOUD_PROJECT): the metadata "
            "server at %s did not answer: %s",
            host,
            e,
        )
        return None


# Requests -------------------------------------------------------------------------------------------


class RequestTrace:
    """One request's trace, from `start` to `end` (in the request's own task): `headers` go out with
    the answer (`traceparent` of the server's span)."""

    __slots__ = ("headers", "_ids_token", "_span", "_span_token", "_context_token")

    def __init__(self, ids: TraceIds | None = None, span: Any = None, context_token: Any = None):
        self._span, self._context_token = span, context_token
        self._ids_token = current.set(ids) if ids is not None else None
        self._span_token = _server_span.set(span) if span is not None else None
        self.headers: dict[str, str] = {"traceparent": _traceparent(ids)} if span is not None and ids else {}

    def end(self, exchange: Any) -> None:
        """End the request's span, with what runtime.app's Exchange says it was and how it ended."""
        if self._span is not None:
            span, protocol, status = self._span, exchange.protocol, exchange.status or "500"
            span.set_attributes({"kiln.protocol": protocol, "kiln.api": exchange.api, "kiln.status": status})
            if exchange.model:
                span.set_attributes({"kiln.model": exchange.model, "kiln.model_version": exchange.version})
            if protocol == "grpc":
                span.set_attribute("rpc.system", "grpc")
                failed = status in GRPC_ERRORS
            else:  # an HTTP status, or the code name of what ended the request before it had one
                code = int(status) if status.isdigit() else None
                if code is not None:
                    span.set_attribute("http.response.status_code", code)
                failed = code is None or code >= 500
            if failed:
                from opentelemetry.trace import Status, StatusCode

                span.set_status(Status(StatusCode.ERROR, status))
            span.end()
            if self._span_token is not None:
                _server_span.reset(self._span_token)
            from opentelemetry import context

            context.detach(self._context_token)
        if self._ids_token is not None:
            current.reset(self._ids_token)


NO_TRACE = RequestTrace()


def start(headers: Mapping[str, str], name: str) -> RequestTrace:
    """The trace of a request with these headers (lower-case names; gRPC's metadata), made current:
    with spans on, a server span continuing the caller's trace; without, the caller's ids for logs."""
    if _tracer is None:
        ids = _caller(headers)
        return RequestTrace(ids) if ids is not None else NO_TRACE
    from opentelemetry import context, propagate, trace

    carrier = headers
    if "traceparent" not in headers:
        ids = _caller(headers)  # Cloud Run's X-Cloud-Trace-Context alone: continue its trace
        if ids is not None:
            carrier = {**headers, "traceparent": _traceparent(ids)}
    span = _tracer.start_span(name, context=propagate.extract(carrier), kind=trace.SpanKind.SERVER)
    token = context.attach(trace.set_span_in_context(span))
    return RequestTrace(_ids_of(span), span, token)


class _NoSpan:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


_NO_SPAN = _NoSpan()


def span(name: str):
    """A child span of the current one (a context manager; nothing when spans are off)."""
    return _NO_SPAN if _tracer is None else _tracer.start_as_current_span(name)


def model_span(model: str, version: int, signature: str):
    """The span of a request's model work (queue, batch and engine), a child of the request's; what it
    ran on also goes on the request's span."""
    if _tracer is None:
        return _NO_SPAN
    attributes = {"kiln.model": model, "kiln.model_version": str(version), "kiln.signature": signature}
    server = _server_span.get()
    if server is not None:
        server.set_attributes(attributes)
    return _tracer.start_as_current_span("kiln.run", attributes=attributes)


def link() -> Any:
    """The current span's context, for a batch to link to (None when spans are off)."""
    if _tracer is None:
        return None
    from opentelemetry import trace

    return trace.get_current_span().get_span_context()


def batch(links: Sequence[Any], enqueued: Sequence[float], **attributes: Any):
    """A batch's span, linked to the spans of the requests it merged (a batch has many parents); each
    of those requests also gets a `kiln.queue` child span for its wait, from `enqueued` (its
    time.monotonic()) to now."""
    if _tracer is None:
        return _NO_SPAN
    from opentelemetry import trace

    now, monotonic = time.time_ns(), time.monotonic()
    contexts = [context for context in links if context is not None]
    for context, since in zip(links, enqueued):
        if context is not None:
            _tracer.start_span(
                "kiln.queue",
                context=trace.set_span_in_context(trace.NonRecordingSpan(context)),
                start_time=now - int((monotonic - since) * 1e9),
            ).end(end_time=now)
    return _tracer.start_as_current_span(
        "kiln.batch",
        context=trace.set_span_in_context(trace.INVALID_SPAN),
        links=[trace.Link(c) for c in contexts],
        attributes={f"kiln.{key}": value for key, value in attributes.items()},
    )


# Log lines ------------------------------------------------------------------------------------------


def log_fields() -> dict[str, Any]:
    """The trace fields of a line logged now (none outside a traced request)."""
    ids = current.get()
    if ids is None:
        return {}
    if _project:
        return {
            "logging.googleapis.com/trace": f"projects/{_project}/traces/{ids.trace_id}",
            "logging.googleapis.com/spanId": ids.span_id,
            "logging.googleapis.com/trace_sampled": ids.sampled,
        }
    return {"trace_id": ids.trace_id, "span_id": ids.span_id, "trace_sampled": ids.sampled}


# Header formats -------------------------------------------------------------------------------------


def _caller(headers: Mapping[str, str]) -> TraceIds | None:
    """The caller's ids: W3C traceparent, else Cloud Run's X-Cloud-Trace-Context (TRACE/SPAN;o=1,
    the span id in decimal)."""
    value = headers.get("traceparent")
    if value is not None:
        match = TRACEPARENT.match(value.strip())
        if match and match[1] != "0" * 32 and match[2] != "0" * 16:
            return TraceIds(match[1], match[2], bool(int(match[3], 16) & 1))
        return None
    value = headers.get("x-cloud-trace-context")
    match = CLOUD_TRACE.match(value.strip()) if value is not None else None
    if match is None or int(match[2]) >= 1 << 64 or not int(match[2]):
        return None
    return TraceIds(match[1].lower(), f"{int(match[2]):016x}", match[3] == "1")


def _ids_of(span: Any) -> TraceIds:
    context = span.get_span_context()
    return TraceIds(f"{context.trace_id:032x}", f"{context.span_id:016x}", context.trace_flags.sampled)


def _traceparent(ids: TraceIds) -> str:
    return f"00-{ids.trace_id}-{ids.span_id}-{'01' if ids.sampled else '00'}"
