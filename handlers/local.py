"""The local server: the core as an ASGI application, served by uvicorn for `kiln serve`.

The adapter only turns ASGI into runtime.app.Request and back. Bodies are read up to the core's
limit and no further (a larger one is answered 413 without reading it all). The core runs model
work off the event loop, so the loop stays free for other requests; uvicorn's own shutdown lets
in-flight requests finish. With a gRPC port, TensorFlow Serving's gRPC API (handlers.grpc_server)
runs beside it on the same event loop.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from runtime.app import App, Request, Response
from runtime.errors import BodyTooLarge

log = logging.getLogger(__name__)
GRACE_SECONDS = 30  # how long in-flight requests may take to finish at shutdown, REST and gRPC


class AsgiApp:
    def __init__(self, app: App):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request = Request(scope["method"], scope["path"], headers)
        try:
            request = replace(request, body=await _read_body(receive, self.app.max_body_bytes))
        except BodyTooLarge as e:
            await _send(send, await self.app.handle(request, refused=e))
            return
        await _send(send, await self.respond(request))

    async def respond(self, request: Request) -> Response:
        """The answer to a request read whole: the core's. A platform's adapter overrides it to
        answer some requests itself (the Cloud Run service: the events Google posts to it)."""
        return await self.app.handle(request)


async def _read_body(receive, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"the request body is over the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return b"".join(chunks)


async def _send(send, response: Response) -> None:
    headers = [(k.lower().encode(), v.encode()) for k, v in response.headers.items()]
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


async def _lifespan(receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def serve(app: App, *, host: str = "0.0.0.0", rest_port: int = 8501, grpc_port: int | None = None) -> None:
    """Serve REST (and gRPC when grpc_port is given) until SIGINT or SIGTERM; in-flight requests
    finish before the process exits."""
    with asyncio.Runner(loop_factory=_fast_loop()) as runner:
        runner.run(_serve(app, host, rest_port, grpc_port))


def _fast_loop():
    """uvloop's event loop where it is installed (a dependency; optional for embedders): it halves
    the loop's own cost per request."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _serve(app: App, host: str, rest_port: int, grpc_port: int | None) -> None:
    """Both servers on one event loop; uvicorn owns the signals. The gRPC server (imported only when
    asked for) stops inside uvicorn's graceful shutdown: after it, uvicorn re-raises the signal."""
    import uvicorn

    grpc_server = None
    if grpc_port is not None:
        from handlers.grpc_server import serve_grpc

        grpc_server = await serve_grpc(app, grpc_port, host)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            stopping = [grpc_server.stop(GRACE_SECONDS)] if grpc_server is not None else []
            await asyncio.gather(super().shutdown(sockets), *stopping)

    config = uvicorn.Config(AsgiApp(app), host=host, port=rest_port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=GRACE_SECONDS)
    try:
        await Server(config).serve()
    finally:  # uvicorn failed to start, or returned without a signal
        if grpc_server is not None:
            await grpc_server.stop(GRACE_SECONDS)
