"""The Cloud Run service: the core on functions-framework's ASGI mode, plus the events Google posts.

    functions-framework --asgi --source handlers/cloud_run.py --target serve [--port 8080]

functions-framework's ASGI mode (3.9+; `--asgi`, or the @functions_framework.aio.http decorator,
which selects it by itself): the target must be a plain function, which gets a Starlette Request for
every method at every path and may return any ASGI application; Starlette then calls it with the
request's scope, receive and send. `serve` returns the core's ASGI adapter (handlers.local.AsgiApp),
so the body is read once, under the core's limit, and every REST route of the core (TF Serving's
REST API, the Open Inference Protocol, metrics, health) is served as by `kiln serve`, with the
micro-batcher on the worker's event loop (adaptive batching unless KILN_BATCHING says otherwise).
Settings come from the KILN_* environment (runtime.settings) and are checked at import: a wrong one
fails the container's start, naming the variable.

Workers. One event loop thread per process cannot use an instance's vCPUs, so the service runs
gunicorn's workers (functions-framework's WORKERS), which are what Kiln's own supervisor
(handlers.supervisor, `kiln serve --workers`) would be here: gunicorn already holds the port (one
inherited socket), restarts a worker that dies, and drains them all on SIGTERM. This module sets
WORKERS, unless it is set, to KILN_WORKERS or else the CPUs this process may run on (which follow
Cloud Run's --cpu), and, with more than one, a fresh PROMETHEUS_MULTIPROC_DIR: /metrics is the sum
over the workers (runtime.metrics); each new worker clears the live gauges of dead ones.

Start-up. functions-framework imports this module in gunicorn's master process, then forks the
uvicorn workers that serve. Threads do not survive a fork (the repository's poller, the engines' thread
pools), so the models load in the worker: as soon as it is forked, in a thread, while the worker
starts; requests that arrive before the models are loaded wait for them (a process that was not
forked loads on its first request). A start that fails exits the process with status 3, on which
gunicorn stops: the container fails to start, with the reason in its log. A Cloud Run startup probe
on /v2/health/ready holds traffic until the models are loaded.

Events, at the service root (`POST /`: where Eventarc delivers, and the push endpoint to give a Pub/Sub
subscription; the core has no route there). Cloud Run's IAM authenticates them (the invoker role of
the subscription's or trigger's service account); Kiln's API keys do not apply. Results go to
KILN_OUTPUT_PREFIX (gs://, s3:// or a path).

- Pub/Sub (push, or Eventarc's messagePublished): the message's data is a TensorFlow Serving predict
  body with a "model" key (default: KILN_SCORE_MODEL, or the only model served). The predict response
  is written to PREFIX/MESSAGE_ID.json as strict JSON (NaN and ±Infinity as strings: handlers.records);
  a message already answered (a redelivery: Pub/Sub delivers at least once) is acknowledged without
  running again. Pub/Sub redelivers anything not answered 2xx, so a message that can never succeed
  (not base64 or JSON, an unknown model, inputs the signature refuses: runtime.errors.retryable, the
  Lambda handler's rule too) is acknowledged all the same: the error is logged and recorded at
  PREFIX/MESSAGE_ID.error.json, where it can be inspected, instead of the message coming back until
  its retention runs out. Failures that may pass (a full queue, a store that is down, a session
  conflict) answer 5xx, and Pub/Sub redelivers with its backoff (to a dead-letter topic after its
  maximum attempts, if set).
- Cloud Storage (Eventarc's object finalized): the object is batch-scored as for S3
  (runtime.scoring.score_object into KILN_OUTPUT_PREFIX, with KILN_SCORE_MODEL); a redelivered event
  finds the results in place and is skipped, and so is an object that is itself a result (a trigger
  on the bucket the results go to would otherwise score its own results). An object that can never
  be scored (gone, a name scoring does not take, a header that fits no input) is acknowledged and
  logged; transient failures answer 5xx, and Eventarc redelivers. Bad rows do not fail the object:
  scoring records them in the results.
- Anything else posted there gets 400 with an error naming what was expected.
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

from handlers.gcp_events import ObjectFinalized, PubsubDelivery, read_event  # noqa: E402
from handlers.local import AsgiApp  # noqa: E402
from runtime import logs  # noqa: E402
from runtime.app import App  # noqa: E402
from runtime.errors import KilnError, retryable, status_of  # noqa: E402
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
        message = delivery.message
        outputs = self.outputs.open("Pub/Sub messages")
        result_key, error_key = f"{message.id}.json", f"{message.id}.error.json"
        for key in (result_key, error_key):
            if await asyncio.to_thread(outputs.exists, key):
                return _answer(message_id=message.id, status="duplicate", output=f"{outputs.url}/{key}")
        try:
            body = await self._predict(message.payload(), exchange)
        except KilnError as e:
            if retryable(e):
                raise
            record = {
                "message_id": message.id,
                "subscription": delivery.subscription,
                "publish_time": message.publish_time,
                "attributes": message.attributes,
                "delivery_attempt": delivery.delivery_attempt,
                "status": status_of(e)[0],
                "error": str(e),
            }
            await asyncio.to_thread(outputs.write_bytes, error_key, orjson.dumps(record))
            log.warning(
                "Pub/Sub message %s cannot succeed; acknowledged, its error recorded at %s/%s: %s",
                message.id,
                outputs.url,
                error_key,
                e,
            )
            return _answer(message_id=message.id, status="failed", error=str(e), output=f"{outputs.url}/{error_key}")
        await asyncio.to_thread(outputs.write_bytes, result_key, body)
        return _answer(message_id=message.id, status="scored", output=f"{outputs.url}/{result_key}")

    async def _predict(self, payload: bytes, exchange: Exchange) -> bytes:
        """The TF Serving predict response to a message's predict body, as strict JSON (handlers.records)."""
        from handlers.records import predict_message

        _, response = await predict_message(self.app, payload, self.settings.score_model, exchange)
        return orjson.dumps(response)

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
