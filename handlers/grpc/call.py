"""What every gRPC call does around its own work (`serve_call`): request id, authentication from
metadata, the client's deadline, a KilnError mapped to its gRPC code through runtime.errors.status_of,
the metrics and the access log. Every service module (tfserving, oip, generation) uses it."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc

from runtime import logs
from runtime.app import App
from runtime.errors import KilnError, status_of
from runtime.exchange import Exchange

log = logging.getLogger(__name__)
T = TypeVar("T")
OPEN_APIS = frozenset({"health"})  # as REST health: probes need no key


class Service:
    """What every servicer holds: the core it adapts to."""

    def __init__(self, app: App):
        self.app = app


def text_metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """The call's text metadata, by lower-case key (the headers of gRPC)."""
    return text(context.invocation_metadata())


def text(metadata: Any) -> dict[str, str]:
    return {key.lower(): value for key, value in metadata or () if isinstance(value, str)}


async def serve_call(
    app: App,
    context: grpc.aio.ServicerContext,
    api: str,
    work: Callable[[Exchange], Awaitable[T]],
    authenticate: Callable[[Mapping[str, str]], str | None] | None = None,
) -> T:
    """Serve one call: what every servicer method does around its own work. `authenticate`: who the
    metadata names (default: the tenant of its API key; reload asks for an administrator instead)."""
    metadata = text_metadata(context)
    remaining = context.time_remaining()
    deadline = None if remaining is None else time.monotonic() + remaining
    with app.exchange(
        "grpc", api, what=f"gRPC {api}", request_id=metadata.get("x-request-id"), deadline=deadline, headers=metadata
    ) as exchange:
        context.set_trailing_metadata((("x-request-id", logs.request_id.get()), *exchange.trace.headers.items()))
        try:
            if api not in OPEN_APIS:
                exchange.tenant = (authenticate or app.auth.tenant)(metadata)
            return await work(exchange)
        except KilnError as e:
            exchange.status, message = status_of(e)[1], str(e)
        except Exception:  # a bug: the client gets INTERNAL, the log gets the traceback
            log.exception("internal error serving gRPC %s", api)
            exchange.status, message = "INTERNAL", "internal error"
    await context.abort(grpc.StatusCode[exchange.status], message)
    raise AssertionError("context.abort returned")  # it raises, ending the call
