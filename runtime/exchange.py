"""What one request is, as every entry point hands it to the core and gets it back: the Request
(method, path, headers, body, the platform's deadline), the Response, and the Exchange (what it is
and did, filled in as it is served: its metrics' labels, access log line, tenant and trace); and the
error answer every failure becomes (TF Serving's {"error": ...} with the error's status)."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable, Mapping
from dataclasses import dataclass, field, replace

import orjson

from runtime import tracing
from runtime.errors import Unauthenticated, status_of

JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict)  # names lower-case
    body: bytes = b""
    deadline: float | None = None  # time.monotonic() by which the answer is due, from the platform


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=lambda: dict(JSON))
    stream: AsyncGenerator[bytes, None] | None = None  # a body sent as it is made (server-sent events), after `body`


async def whole(pending: Awaitable[Response]) -> Response:
    """The response with a streamed body read into `body`, for platforms that cannot stream (Lambda)."""
    response = await pending
    if response.stream is None:
        return response
    chunks = [chunk async for chunk in response.stream]
    return replace(response, body=response.body + b"".join(chunks), stream=None)


@dataclass
class Exchange:
    """What one request is and did, filled in as it is served: the labels of its metrics and
    its access log line, and the tenant its credentials name."""

    protocol: str
    api: str = "unknown"
    model: str = ""
    version: str = ""
    tenant: str | None = None
    deadline: float | None = None
    started: float = field(default_factory=time.perf_counter)
    status: str = "OK"  # as the protocol says it: an HTTP status, or a gRPC code's name
    what: str = ""  # the access log line's description of the request
    trace: tracing.RequestTrace = tracing.NO_TRACE  # its span (OpenTelemetry) or its caller's trace ids


def error_response(error: BaseException, message: str | None = None) -> Response:
    """TF Serving's {"error": ...} with the error's status; `message` in place of the error's own."""
    http, _ = status_of(error)
    headers = {**JSON, "WWW-Authenticate": "Bearer"} if isinstance(error, Unauthenticated) else JSON
    return Response(http, error_body(message if message is not None else error), headers)


def error_body(error: BaseException | str, **fields) -> bytes:
    """{"error": message, **fields} as JSON. It cannot fail, since it runs where every other failure
    has been caught: a message JSON cannot hold (a lone surrogate quoted from a request) is written
    with escapes, and an error whose str() fails or is empty is named by its type."""
    try:
        text = str(error)
    except Exception:
        text = ""
    text = text or f"{type(error).__name__} (no message)"
    try:
        return orjson.dumps({"error": text, **fields})
    except TypeError:  # orjson refuses text that is not Unicode
        return orjson.dumps({"error": text.encode("utf-8", "backslashreplace").decode(), **fields})
