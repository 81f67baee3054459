"""The protocol-neutral core: a request is (method, path, headers, body: runtime.exchange); the core
routes it by the route table below to its endpoint (runtime.endpoints), which decodes it with a codec,
runs it on the version the repository hands out (model work: runtime.runner) and encodes the answer.
Every handler (local server, gRPC, Lambda, Cloud Run) adapts its events to `App.respond`, or for
calls it decodes itself (gRPC) to `App.execute`; none routes, runs models or maps errors itself.

Routes. TensorFlow Serving's REST API v1:
  GET  /v1/models/NAME[/versions/N | /labels/L]            model status
  GET  /v1/models/NAME[/versions/N | /labels/L]/metadata   signature metadata
  POST /v1/models/NAME[/versions/N | /labels/L]:predict    predict (row or columnar JSON)
  POST /v1/models/NAME[/versions/N | /labels/L]:classify   classify tf.Examples given as JSON
  POST /v1/models/NAME[/versions/N | /labels/L]:regress    regress tf.Examples given as JSON
  POST /v1/models/NAME[/versions/N | /labels/L]:generate   generate tokens in a session (runtime.sessions.generate)
  GET  /v1/models                                          every served model (Kiln's; TF Serving lacks it)
The Open Inference Protocol (KServe v2) over REST:
  GET  /v2, /v2/health/live, /v2/health/ready              server metadata, liveness, readiness
  GET  /v2/models/NAME[/versions/N][/ready]                model metadata, model readiness
  POST /v2/models/NAME[/versions/N]/infer                  inference on JSON tensors (or binary: the extension)
  POST /v2/repository/index                                every served model version (Triton's extension)
Prometheus metrics: GET /monitoring/prometheus/metrics (TF Serving's path) and /metrics.

Around every request: its id (X-Request-Id, echoed), authentication and CORS (runtime.access), its
deadline (X-Kiln-Timeout-Ms on HTTP; the handler's own, such as a gRPC deadline), a metrics record
and a JSON access log line.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from runtime import endpoints, logs, tracing
from runtime.access import DEFAULT_TENANT, OPEN_PATHS, Auth, Cors
from runtime.batching import BatchingParameters, BatchingPolicy
from runtime.codecs import examples
from runtime.core import Core
from runtime.endpoints import Parts
from runtime.errors import BodyTooLarge, InvalidInput, KilnError, NotFound, status_of
from runtime.exchange import Exchange, Request, Response, error_response
from runtime.metrics import Metrics
from runtime.repository import Repository, ServableHandle
from runtime.runner import Runner, time_left
from runtime.settings import Settings

if TYPE_CHECKING:
    from runtime.sessions.services import Sessions

log = logging.getLogger(__name__)
access_logger = logging.getLogger("kiln.access")
DEFAULT_MAX_BODY_BYTES = 64 << 20
TIMEOUT_HEADER = "x-kiln-timeout-ms"
MODEL_PATH = r"/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
OIP_MODEL_PATH = r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>\d+))?"
METRICS_PATHS = ("/metrics", "/monitoring/prometheus/metrics")


class App:
    def __init__(
        self,
        repository: Repository,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        metrics: Metrics | None = None,
        auth: Auth = Auth(),
        cors: Cors = Cors(),
        batching: Callable[[str], BatchingParameters] | None = None,
        access_log: bool = False,
        sessions: Sessions | None = None,
    ):
        """`batching`: each model's batching parameters by name; None runs every request alone.
        `access_log`: a JSON line per request (off by default: Lambda and Cloud Run log requests
        themselves, and the line costs a tenth of a small request's time)."""
        self.repository = repository
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics or Metrics(repository)
        self.auth = auth
        self.cors = cors
        self.batching = batching
        self.access_log = access_log
        self._sessions = sessions  # see the property
        self.runner = Runner(repository, self.metrics, batching)
        self.metrics_paths: tuple[str, ...] = METRICS_PATHS

    @classmethod
    def start(cls, settings: Settings) -> App:
        """The app an entry point serves: its repository started (the models loaded and warmed
        up) and batching per the settings. The caller stops app.repository when done."""
        repository = Repository(
            settings.model_config(),
            poll_seconds=settings.poll_seconds,
            warmup_iterations=settings.warmup_iterations,
            warmup=settings.warmup,
        )
        repository.start()
        batching = BatchingPolicy(settings.batching, lambda name: repository.config_of(name).batching_parameters)
        from runtime.sessions.services import Sessions

        app = cls(
            repository,
            max_body_bytes=settings.max_body_bytes,
            auth=settings.auth,
            cors=settings.cors,
            batching=batching,
            access_log=settings.access_log,
            sessions=Sessions(settings.redis_url, settings.session_ttl_seconds, settings.prediction_cache_seconds),
        )
        if settings.metrics_paths is not None:  # a TF Serving monitoring config's
            app.metrics_paths = settings.metrics_paths
        app.metrics.started()
        tracing.configure()
        # What start-up made (modules, models) lives as long as the process: out of the collector's
        # sight, a full collection no longer walks it. A JSON request's lists trigger one every few
        # hundred requests, which cost a fifth of a small request's time.
        gc.freeze()
        return app

    # Around every request ------------------------------------------------------------------------

    @contextmanager
    def exchange(
        self,
        protocol: str,
        api: str = "unknown",
        *,
        what: str = "",
        request_id: str | None = None,
        deadline: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Iterator[Exchange]:
        """What every entry point does around one request, written once: its request id (the one
        presented, if sensible; else the one already in force, such as a Lambda invocation's; else a
        new one), its Exchange and its trace (continuing the caller's, from headers: lower-case names),
        and at the end its status counted and logged (finished). The caller
        sets exchange.status for an answer it makes itself (an HTTP status); an exception leaving the
        block sets it by runtime.errors.status_of (its gRPC code name), CANCELLED when the task was
        cancelled, DEADLINE_EXCEEDED when that happened past the deadline."""
        exchange = Exchange(protocol, api=api, deadline=deadline, what=what or f"{protocol} {api}")
        current = logs.request_id.get()
        token = logs.request_id.set(logs.new_request_id(request_id)) if request_id or current is None else None
        exchange.trace = tracing.start(headers or {}, exchange.what)
        try:
            yield exchange
        except asyncio.CancelledError:  # the client left, or the platform ended the call at its deadline
            passed = exchange.deadline is not None and time.monotonic() >= exchange.deadline
            exchange.status = "DEADLINE_EXCEEDED" if passed else "CANCELLED"
            raise
        except BaseException as e:
            exchange.status = status_of(e)[1] if isinstance(e, Exception) else "CANCELLED"
            raise
        finally:
            self.finished(exchange, exchange.status, exchange.what)
            exchange.trace.end(exchange)
            if token is not None:
                logs.request_id.reset(token)

    async def respond(self, request: Request, refused: KilnError | None = None) -> Response:
        """Answer one HTTP request; every failure becomes TF Serving's {"error": ...} with its status.
        `refused`: why the handler could not take the request (a body over the limit while reading
        it), answered here so that it is counted, logged and marked like any other answer."""
        with self.exchange(
            "rest",
            what=f"{request.method} {request.path}",
            headers=request.headers,
            request_id=request.headers.get("x-request-id"),
            deadline=request.deadline,
        ) as exchange:
            response = error_response(refused) if refused else await self._answer(request, exchange)
            origin = request.headers.get("origin")
            exchange.status = str(response.status)
            return replace(
                response,
                headers={
                    **response.headers,
                    **self.cors.headers(origin),
                    "X-Request-Id": logs.request_id.get() or "",
                    **exchange.trace.headers,
                },
            )

    async def _answer(self, request: Request, exchange: Exchange) -> Response:
        try:
            if request.method == "OPTIONS":
                exchange.api = "preflight"
                return Response(
                    204,
                    b"",
                    self.cors.preflight_headers(
                        request.headers.get("origin"), request.headers.get("access-control-request-headers")
                    ),
                )
            if request.path not in OPEN_PATHS:
                exchange.tenant = self.auth.tenant(request.headers)
            exchange.deadline = _deadline(request)
            return await self._route(request, exchange)
        except KilnError as e:
            return error_response(e)
        except Exception as e:  # a bug: the client gets a plain 500, the log gets the traceback
            log.exception("internal error serving %s %s", request.method, request.path)
            return error_response(e, "internal error")

    def finished(self, exchange: Exchange, status: str, what: str) -> None:
        """Count the request in the metrics and write its access log line."""
        seconds = time.perf_counter() - exchange.started
        exchange.status = status
        self.metrics.request(exchange.protocol, exchange.api, exchange.model, exchange.version, status, seconds)
        if self.access_log:
            access_logger.info(
                "%s %s",
                what,
                status,
                extra={
                    "fields": {
                        "protocol": exchange.protocol,
                        "api": exchange.api,
                        "model": exchange.model,
                        "version": exchange.version,
                        "status": status,
                        "duration_ms": round(seconds * 1e3, 3),
                    }
                },
            )

    async def execute(
        self, handle: ServableHandle, key: str, inputs: dict[str, np.ndarray], exchange: Exchange
    ) -> dict[str, np.ndarray]:
        """Run a signature on decoded inputs for a request: its work goes to the runner
        (runtime.runner: the deadline, alone or batched, the metrics). With the prediction cache on, a
        stateless signature's answer for the same tenant, version and inputs comes from the cache instead."""
        exchange.model, exchange.version = handle.name, str(handle.version)
        time_left(exchange.deadline)  # a request already late is not answered from the cache either
        sessions = self._sessions
        cache = sessions.prediction_cache() if sessions is not None else None
        if sessions is None or cache is None or handle.engine.signature(key).state:
            return await self.runner.run(handle, key, inputs, exchange.deadline, exchange.api)
        tenant, fingerprint = exchange.tenant or DEFAULT_TENANT, sessions.fingerprint(handle)
        cached = await cache.get(tenant, fingerprint, key, inputs)
        if cached is not None:
            return cached
        outputs = await self.runner.run(handle, key, inputs, exchange.deadline, exchange.api)
        await cache.put(tenant, fingerprint, key, inputs, outputs)
        return outputs

    # Routing ------------------------------------------------------------------------------------

    async def _route(self, request: Request, exchange: Exchange) -> Response:
        """The request's route answers it; as TF Serving, a path no route has is malformed under
        /v1/ and unknown elsewhere, and a route asked with another method names the one it takes."""
        found = _routes(self.metrics_paths).find(request.path)
        if found is None:
            if request.path.startswith("/v1/"):
                raise InvalidInput(f"Malformed request: {request.method} {request.path}")
            raise NotFound(f"no such endpoint: {request.method} {request.path}")
        route, parts = found
        exchange.api = route.api
        if request.method != route.method:
            raise InvalidInput(
                route.refusal.format(**parts, method=request.method, path=request.path, allowed=route.method)
            )
        if route.body:
            self._check_size(request)
        return await route.answer(self, request, exchange, parts)

    def ready(self) -> bool:
        """Every configured model has a version that can take requests, and there is one at least: a
        configuration with nothing to serve is not ready (REST /v2/health/ready and gRPC ServerReady)."""
        names = self.repository.names()
        return bool(names) and all(self.repository.is_available(name) for name in names)

    def _check_size(self, request: Request) -> None:
        if len(request.body) > self.max_body_bytes:
            raise BodyTooLarge(f"the request body has {len(request.body)} bytes; the limit is {self.max_body_bytes}")

    @property
    def sessions(self) -> Sessions:
        """Where agent sessions live, made on first use."""
        if self._sessions is None:
            from runtime.sessions.services import Sessions

            self._sessions = Sessions()
        return self._sessions

    async def run_examples(
        self, handle: ServableHandle, key: str, method: str, serialized: np.ndarray, exchange: Exchange
    ) -> dict[str, np.ndarray]:
        """Run a classify or regress signature on serialized tf.Examples (REST and gRPC alike)."""
        input_name = examples.check_method(key, handle.engine.signature(key), method)
        return await self.execute(handle, key, {input_name: serialized}, exchange)


ONLY = "{method} is not supported on {path}; use {allowed}"
VERB = ":{verb} takes {allowed}, not {method}"


@dataclass(frozen=True)
class Route:
    """One REST endpoint: the method it takes, its path (a regular expression, matched whole), the
    api its metrics and access log name, and its answer. `body`: the answer reads the body, whose
    size is checked first. `refusal`: the message for another method (with the path's parts, method,
    path and allowed)."""

    method: str
    path: str
    api: str
    answer: Callable[[Core, Request, Exchange, Parts], Awaitable[Response]]
    body: bool = False
    refusal: str = ONLY


class Routes:
    """A route table, looked up as fast as the if-chain it replaced: paths without parts by a dict,
    the others by their literal beginning, then their expression (in the table's order, which
    matters only where two expressions share a beginning)."""

    def __init__(self, routes: list[Route]):
        self.exact: dict[str, Route] = {}
        self.patterns: dict[str, list[tuple[re.Pattern[str], Route]]] = {}
        for route in routes:
            if re.escape(route.path) == route.path:
                self.exact.setdefault(route.path, route)  # the first route of a path wins
            else:
                beginning = re.split(r"[\\()\[\]{}?*+|.^$]", route.path, maxsplit=1)[0]
                self.patterns.setdefault(beginning, []).append((re.compile(route.path), route))

    def find(self, path: str) -> tuple[Route, Parts] | None:
        """The path's route and its named parts; None for a path no route has."""
        route = self.exact.get(path)
        if route is not None:
            return route, {}
        for beginning, routes in self.patterns.items():
            if path.startswith(beginning):
                for pattern, route in routes:
                    if (match := pattern.fullmatch(path)) is not None:
                        return route, match.groupdict()
        return None


@functools.cache
def _routes(metrics_paths: tuple[str, ...]) -> Routes:
    """The route table: the metrics paths (configurable, first: they win over an API's path), TF
    Serving's REST API, the OIP's. No path has two routes but a verb: a known one's comes first,
    then any other's (answered 400)."""
    return Routes(
        [
            *(Route("GET", re.escape(path), "metrics", endpoints.metrics) for path in metrics_paths),
            Route("POST", MODEL_PATH + ":(?P<verb>predict)", "predict", endpoints.predict, True, VERB),
            Route("POST", MODEL_PATH + ":(?P<verb>classify)", "classify", endpoints.classify_or_regress, True, VERB),
            Route("POST", MODEL_PATH + ":(?P<verb>regress)", "regress", endpoints.classify_or_regress, True, VERB),
            Route("POST", MODEL_PATH + ":(?P<verb>generate)", "generate", endpoints.generate, True, VERB),
            Route("POST", MODEL_PATH + ":(?P<verb>[A-Za-z]+)", "unknown", endpoints.unknown_verb, True, VERB),
            Route("GET", MODEL_PATH, "status", endpoints.status),
            Route("GET", MODEL_PATH + "/metadata", "metadata", endpoints.metadata),
            Route("GET", "/v1/models", "list", endpoints.models),
            Route("GET", "/v1/models/", "list", endpoints.models),
            Route("POST", OIP_MODEL_PATH + "/infer", "infer", endpoints.infer, True),
            Route("GET", OIP_MODEL_PATH, "metadata", endpoints.model_metadata),
            Route("GET", OIP_MODEL_PATH + "/ready", "ready", endpoints.model_ready),
            Route("GET", "/v2", "server_metadata", endpoints.server_metadata),
            Route("GET", "/v2/health/live", "health", endpoints.live),
            Route("GET", "/v2/health/ready", "health", endpoints.ready),
            Route("POST", "/v2/repository/index", "repository_index", endpoints.repository_index),
        ]
    )


def _deadline(request: Request) -> float | None:
    """The earlier of the platform's deadline and the one the X-Kiln-Timeout-Ms header asks for."""
    value = request.headers.get(TIMEOUT_HEADER)
    if value is None:
        return request.deadline
    try:
        milliseconds = float(value)
    except ValueError:
        milliseconds = float("nan")
    if not milliseconds > 0 or milliseconds == float("inf"):
        raise InvalidInput(f"X-Kiln-Timeout-Ms must be a positive number of milliseconds, got {value!r}")
    deadline = time.monotonic() + milliseconds / 1e3
    return deadline if request.deadline is None else min(deadline, request.deadline)
