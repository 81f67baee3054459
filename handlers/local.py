"""The local server: the core as an ASGI application, served by uvicorn for `kiln serve`.

The adapter only turns ASGI into runtime.exchange.Request and back. Bodies are read up to the core's
limit and no further (a larger one is answered 413 without reading it all). The core runs model
work off the event loop, so the loop stays free for other requests; uvicorn's own shutdown lets
in-flight requests finish. With a gRPC port, TensorFlow Serving's gRPC API (handlers.grpc)
runs beside it on the same event loop. Connections are bounded in time and number
(handlers.connections: header, body and keep-alive timeouts, a connection cap).

No exception leaves the adapter: uvicorn would answer it with a plain-text 500. Response header
values go out as the bytes they came in as (latin-1, as ASGI decodes them), so an echoed
X-Request-Id or Origin is returned unchanged, and a value HTTP cannot carry is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from dataclasses import replace
from functools import partial

from handlers.supervisor import GRACE_SECONDS
from runtime.app import App
from runtime.errors import BodyTooLarge
from runtime.exchange import Request, Response, error_response
from runtime.settings import Settings

log = logging.getLogger(__name__)
WORKER_HEADER = "X-Kiln-Worker"  # the pid of the worker that answered, with several (handlers.supervisor)
_NOT_IN_A_HEADER = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # what uvicorn refuses in a header value


class ClientGone(Exception):
    """The client left (or was cut off) before its request was read whole: nothing to answer."""


class AsgiApp:
    def __init__(self, app: App, timeout: float | None = None):
        """`timeout`: a request's deadline in seconds when no other sets one (TF Serving's
        --rest_api_timeout_in_ms)."""
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            response = await self._answer(scope, receive)
        except ClientGone:
            return
        except Exception as e:  # a bug; the log gets the traceback, the client JSON
            log.exception("internal error answering %s %s", scope.get("method"), scope.get("path"))
            response = error_response(e, "internal error")
        try:
            await _send(send, response)
        except Exception:  # part of the answer is out (a stream failed): uvicorn closes the connection
            log.exception("the answer to %s %s failed while it was sent", scope["method"], scope["path"])

    async def _answer(self, scope, receive) -> Response:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        request = Request(scope["method"], scope["path"], headers, deadline=deadline)
        try:
            request = replace(request, body=await _read_body(receive, self.app.max_body_bytes))
        except BodyTooLarge as e:
            return await self.app.respond(request, refused=e)
        return await self.respond(request)

    async def respond(self, request: Request) -> Response:
        """The answer to a request read whole: the core's. A platform's adapter overrides it to
        answer some requests itself (the Cloud Run service: the events Google posts to it)."""
        return await self.app.respond(request)


async def _read_body(receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"the request body is over the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return b"".join(chunks)


async def _send(send, response: Response) -> None:
    headers = []
    for name, value in response.headers.items():
        data = value.encode() if value.isascii() and value.isprintable() else _header_bytes(name, value)
        if data is not None:
            headers.append((name.lower().encode(), data))
    if response.stream is None:
        headers.append((b"content-length", str(len(response.body)).encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    if response.stream is None:
        await send({"type": "http.response.body", "body": response.body})
        return
    try:  # chunked: each piece as it is made
        async for chunk in response.stream:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        await response.stream.aclose()


def _header_bytes(name: str, value: str) -> bytes | None:
    """A header value beyond printable ASCII: latin-1 (what a request's value was decoded from, so an
    echo is byte for byte), else UTF-8. None, logged, when HTTP cannot carry it (control characters):
    dropping one header is better than failing the whole answer."""
    try:
        data = value.encode("latin-1")
    except UnicodeEncodeError:
        data = value.encode("utf-8", "backslashreplace")
    if _NOT_IN_A_HEADER.search(data):
        log.warning("dropped the response header %s: its value has control characters: %r", name, value)
        return None
    return data


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def serve(
    app: App,
    *,
    host: str = "0.0.0.0",
    rest_port: int = 8501,
    grpc_port: int | None = None,
    settings: Settings | None = None,
    worker: bool = False,
) -> None:
    """Serve REST (and gRPC when grpc_port is given) until SIGINT or SIGTERM; in-flight requests
    finish before the process exits. `settings`: the connection timeouts and cap (default: the
    defaults of runtime.settings). `worker`: one of several processes on the same ports
    (handlers.supervisor): the REST port is opened with SO_REUSEPORT (gRPC's always is, on Linux)
    and every answer names this process in X-Kiln-Worker."""
    settings = settings or Settings()
    with asyncio.Runner(loop_factory=_fast_loop()) as runner:
        runner.run(_serve(app, host, rest_port, grpc_port, settings, worker))


def _shared_socket(host: str, port: int):
    """The REST port opened with SO_REUSEPORT, as uvicorn would open it otherwise."""
    from handlers.supervisor import reserve_port

    sock = reserve_port(host, port)
    sock.set_inheritable(False)
    return sock


def _fast_loop():
    """uvloop's event loop where it is installed (a dependency; optional for embedders): it halves
    the loop's own cost per request."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _serve(app: App, host: str, rest_port: int, grpc_port: int | None, settings: Settings, worker: bool) -> None:
    """Both servers on one event loop; uvicorn owns the signals. The gRPC server (imported only when
    asked for) stops inside uvicorn's graceful shutdown: after it, uvicorn re-raises the signal."""
    import uvicorn

    from handlers.connections import LimitedHttpToolsProtocol

    grpc_server = None
    if grpc_port is not None:
        from handlers.grpc.server import serve_grpc

        grpc_server = await serve_grpc(app, grpc_port, host, settings)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            stopping = [grpc_server.stop(GRACE_SECONDS)] if grpc_server is not None else []
            await asyncio.gather(super().shutdown(sockets), *stopping)

    protocol = partial(
        LimitedHttpToolsProtocol,
        header_timeout=settings.header_timeout_seconds,
        body_timeout=settings.body_timeout_seconds,
        max_connections=settings.max_connections or None,
    )
    config = uvicorn.Config(
        AsgiApp(app, settings.rest_timeout_seconds),
        host=host,
        port=rest_port,
        log_level="warning",
        access_log=False,
        # uvicorn takes a protocol factory and a float timeout, whatever its annotations say
        timeout_graceful_shutdown=GRACE_SECONDS,
        http=protocol,  # type: ignore[arg-type]
        timeout_keep_alive=settings.keepalive_timeout_seconds,  # type: ignore[arg-type]
        headers=[(WORKER_HEADER, str(os.getpid()))] if worker else None,
    )
    try:
        await Server(config).serve(sockets=[_shared_socket(host, rest_port)] if worker else None)
    finally:  # uvicorn failed to start, or returned without a signal
        if grpc_server is not None:
            await grpc_server.stop(GRACE_SECONDS)
