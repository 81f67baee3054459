"""The Cloud Run service: the core on functions-framework's ASGI mode, plus the events Google posts.

    functions-framework --asgi --source handlers/cloud_run.py --target serve [--port 8080]

README's "Cloud Run" says what is served and how events are answered. Design: `serve` returns the
core's ASGI adapter (handlers.local.AsgiApp), so a body is read once under the core's limit and every
REST route is served as by `kiln serve`. gunicorn's workers (WORKERS, set here) stand in for Kiln's
supervisor: gunicorn already holds the port, restarts a worker that dies and drains them on SIGTERM.
Threads do not survive gunicorn's fork, so each worker loads the models in a thread as soon as it is
forked (requests wait for them), and a start that fails exits with gunicorn's "worker failed to
boot", so that the container fails to start instead of serving nothing. Events arrive at `POST /`,
where the core has no route; what they share with Lambda's is in handlers.records.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading

import functions_framework.aio
import orjson

from handlers.supervisor import MULTIPROC_ENV, forget_dead_workers, prepare_forked_workers

WORKERS = prepare_forked_workers()  # before runtime.metrics imports prometheus_client

from handlers.gcp_events import ObjectFinalized, PubsubDelivery, PubsubMessage, read_event  # noqa: E402
from handlers.local import AsgiApp  # noqa: E402
from runtime import logs  # noqa: E402
from runtime.app import App  # noqa: E402
from runtime.errors import KilnError, retryable  # noqa: E402
from runtime.exchange import Exchange, Request, Response, error_response  # noqa: E402
from runtime.settings import Settings  # noqa: E402

log = logging.getLogger("handlers.cloud_run")  # functions-framework imports this file as "cloud_run"
EVENTS_PATH = "/"
BOOT_ERROR = 3  # gunicorn's "worker failed to boot": the master stops instead of forking another


class CloudRunApp(AsgiApp):
    """The core's ASGI adapter, which also takes the events posted to the service root."""

    def __init__(self, app: App, settings: Settings):
        super().__init__(app)
        from handlers.records import OutputStore  # with runtime.scoring: on first use, not at start-up

        self.settings = settings
        self.outputs = OutputStore(settings.output_prefix)

    async def respond(self, request: Request) -> Response:
        if request.path == EVENTS_PATH and request.method == "POST":
            return await self._event(request)
        return await super().respond(request)

    async def _event(self, request: Request) -> Response:
        with self.app.exchange(
            "event", "event", what=f"POST {EVENTS_PATH} event", request_id=request.headers.get("x-request-id")
        ) as exchange:
            try:
                event = read_event(request.headers, request.body)
                exchange.api, exchange.what = event.kind, f"POST {EVENTS_PATH} {event.kind}"
                logs.request_id.set(logs.new_request_id(event.id))
                response = (
                    await self._pubsub(event.body, exchange)
                    if isinstance(event.body, PubsubDelivery)
                    else await self._storage(event.body)
                )
            except KilnError as e:
                response = error_response(e)
            except Exception as e:  # a bug: the sender gets a plain 500 (and retries), the log the traceback
                log.exception("internal error serving an event")
                response = error_response(e, "internal error")
            exchange.status = str(response.status)
            return Response(
                response.status, response.body, {**response.headers, "X-Request-Id": logs.request_id.get() or ""}
            )

    # Pub/Sub ------------------------------------------------------------------------------------

    async def _pubsub(self, delivery: PubsubDelivery, exchange: Exchange) -> Response:
        from handlers.records import write_outcome

        message = delivery.message
        outputs = self.outputs.open("Pub/Sub messages")
        for key in (f"{message.id}.json", f"{message.id}.error.json"):
            if await asyncio.to_thread(outputs.exists, key):
                return _answer(message_id=message.id, status="duplicate", output=f"{outputs.url}/{key}")
        about = {
            "message_id": message.id,
            "subscription": delivery.subscription,
            "publish_time": message.publish_time,
            "attributes": message.attributes,
            "delivery_attempt": delivery.delivery_attempt,
        }
        written = await write_outcome(outputs, message.id, self._predict(message, exchange), about)
        if written.error is not None:
            log.warning(
                "Pub/Sub message %s cannot succeed; acknowledged, its error recorded at %s: %s",
                message.id,
                written.url,
                written.error,
            )
            return _answer(message_id=message.id, status="failed", error=str(written.error), output=written.url)
        return _answer(message_id=message.id, status="scored", output=written.url)

    async def _predict(self, message: PubsubMessage, exchange: Exchange) -> dict:
        """The TF Serving predict response to a message's predict body, as strict JSON (handlers.records)."""
        from handlers.records import predict_message

        _, response = await predict_message(self.app, message.payload(), self.settings.score_model, exchange)
        return response

    # Cloud Storage ------------------------------------------------------------------------------

    async def _storage(self, event: ObjectFinalized) -> Response:
        from runtime.scoring import score_object

        prefix = self.outputs.url("Cloud Storage events")
        try:
            result = await score_object(self.app, event.url, prefix, model=self.settings.score_model)
        except KilnError as e:
            if retryable(e):
                raise
            log.warning("%s cannot be scored; the event is acknowledged: %s", event.url, e)
            return _answer(source=event.url, status="failed", error=str(e))
        return _answer(
            source=result.source,
            status="skipped" if result.skipped else "scored",
            output=result.output,
            rows=result.rows,
            errors=result.errors,
        )


def _answer(**fields) -> Response:
    """2xx: Pub/Sub and Eventarc take the event as handled."""
    return Response(200, orjson.dumps(fields))


class _Process:
    """This process's CloudRunApp, started once per process, in a thread."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._started: concurrent.futures.Future | None = None

    def start(self) -> concurrent.futures.Future:
        with self._lock:
            if self._pid != os.getpid() or self._started is None:
                self._pid, self._started = os.getpid(), concurrent.futures.Future()
                threading.Thread(target=self._load, args=(self._started,), name="kiln-start", daemon=True).start()
            return self._started

    def _load(self, started: concurrent.futures.Future) -> None:
        try:
            if os.environ.get(MULTIPROC_ENV):  # the worker this one replaces, if any, is gone
                forget_dead_workers(os.environ[MULTIPROC_ENV])
            started.set_result(CloudRunApp(App.start(self.settings), self.settings))
        except BaseException:  # the process cannot serve: it stops, and the container with it
            log.exception("Kiln could not start; exiting")
            os._exit(BOOT_ERROR)

    async def app(self) -> CloudRunApp:
        started = self._started if self._pid == os.getpid() and self._started is not None else self.start()
        return started.result() if started.done() else await asyncio.wrap_future(started)


SETTINGS = Settings.from_env(batching_mode="adaptive")
logs.configure(SETTINGS.log_level)
_PROCESS = _Process(SETTINGS)
_IMPORTED_IN = os.getpid()
# The worker gunicorn forks from this process starts loading at once (not its own forks, if any).
os.register_at_fork(after_in_child=lambda: os.getppid() == _IMPORTED_IN and _PROCESS.start())


@functions_framework.aio.http
async def serve(request):
    """functions-framework's target: every request, whatever its path, is the core's (or an event)."""
    return await _PROCESS.app()
