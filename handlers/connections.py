"""uvicorn's httptools protocol with the limits of a server that faces the internet, which uvicorn
lacks: without them a connection that never sends a request, a client sending its headers a byte at a
time (slowloris) or declaring a body it never sends holds its socket and memory for ever.

- Header timeout (nginx's client_header_timeout): a request's headers must all arrive within it from
  its first byte, and a new connection must send its first byte within it. On expiry: 408 with a
  JSON error (nothing when the connection never sent a byte), then the connection is closed.
- Body timeout (nginx's client_body_timeout): each stretch of a body, from one received piece to the
  next, must arrive within it; on expiry 408 JSON and close. The clock stops while the server itself
  is not reading (flow control, a pipelined request waiting its turn).
- Connection cap: a request arriving while more connections are open answers 503 JSON and closes
  its connection (uvicorn's limit_concurrency answers plain text and would be bypassed here).
- Between requests uvicorn's own keep-alive timeout applies (timeout_keep_alive).
- uvicorn's answer to HTTP it cannot parse (400) is JSON too.

Imported by handlers.local when it serves, never at start-up: it imports uvicorn and httptools.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = logging.getLogger(__name__)
IDLE, HEADERS, BODY = 0, 1, 2  # what the connection is reading now: nothing, a request's headers, its body


def json_error(
    status: int, message: str, extra: Iterable[tuple[bytes, bytes]] = ()
) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The headers and body of a {"error": ...} answer that closes its connection."""
    body = orjson.dumps({"error": message})
    return [
        *extra,
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"connection", b"close"),
    ], body


async def over_capacity(scope: dict, receive: Any, send: Any) -> None:
    """The ASGI answer to a request over the connection cap."""
    headers, body = json_error(503, "the server has too many connections open; retry shortly", [(b"retry-after", b"1")])
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """One HTTP/1.1 connection, with the header and body timeouts and the connection cap. One timer
    per connection, armed only while a request is being read and moved lazily (a body's pieces only
    note their time; the timer, when it fires, re-arms itself if the deadline moved)."""

    def __init__(
        self, *args: Any, header_timeout: float, body_timeout: float, max_connections: int | None, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.max_connections = max_connections
        self.limit_concurrency = None  # the cap is ours, with a JSON answer
        self._stage = IDLE
        self._timer: asyncio.TimerHandle | None = None
        self._timer_stage = IDLE
        self._last_read = 0.0
        self._received = False  # any byte yet

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.loop.time() + self.header_timeout, HEADERS)  # the first request's clock starts now

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._received = True
        if self._stage == IDLE:
            self._stage = HEADERS  # any byte starts a request's header clock (even bytes before its request line)
        super().data_received(data)
        if self._stage == IDLE:  # whole requests only: none is being read now
            self._disarm()
        elif self._stage == HEADERS:
            if self._timer is None:
                self._arm(self.loop.time() + self.header_timeout, HEADERS)
        else:
            self._last_read = self.loop.time()
            if self._timer_stage != BODY:
                self._arm(self._last_read + self.body_timeout, BODY)

    def on_message_begin(self) -> None:
        self._stage = HEADERS
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._stage = BODY
        over = self.max_connections is not None and len(self.connections) > self.max_connections
        if over:
            log.warning(
                "refused a request: %d connections are open, over the cap of %d (KILN_MAX_CONNECTIONS)",
                len(self.connections),
                self.max_connections,
            )
        self.app = over_capacity if over else self.config.loaded_app  # the app super() starts for this request
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._stage = IDLE
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, msg)

    def _arm(self, deadline: float, stage: int) -> None:
        self._disarm()
        self._timer = self.loop.call_at(deadline, self._timed_out)
        self._timer_stage = stage

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_stage = IDLE

    def _timed_out(self) -> None:
        self._timer = None
        self._timer_stage = IDLE
        if self.transport.is_closing():
            return
        if self._stage == BODY:
            now = self.loop.time()
            if self.flow.read_paused or (self.cycle is not None and self.cycle.waiting_for_100_continue):
                self._last_read = now  # the server is not reading: the client is not late
            if now < self._last_read + self.body_timeout:
                self._arm(self._last_read + self.body_timeout, BODY)
                return
            message = f"the request body stopped arriving: nothing came for {self.body_timeout:g} s"
        elif self._received:
            message = f"the request's headers did not all arrive within {self.header_timeout:g} s"
        else:  # a connection that never sent a byte: nothing to answer
            self.transport.close()
            return
        log.info("closed a connection: %s", message)
        self._refuse(408, message)

    def _refuse(self, status: int, message: str) -> None:
        """Answer `status` with a JSON error, unless part of another answer is already on the wire,
        and close the connection; the request being read, if any, is abandoned."""
        cycle = self.cycle
        if cycle is None or cycle.response_complete or not cycle.response_started:
            headers, body = json_error(status, message, self.server_state.default_headers)
            self.transport.write(
                b"".join(
                    [STATUS_LINE[status], *(name + b": " + value + b"\r\n" for name, value in headers), b"\r\n", body]
                )
            )
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's receive() says so, and what it sends is dropped
            cycle.message_event.set()
        self.transport.close()
