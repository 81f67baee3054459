"""AWS Lambda: every event a Kiln function meets, adapted to the core (runtime.app).

    Handler: handlers.aws_lambda.handler

README's "AWS Lambda" says which events are taken and how each is answered. Design: Lambda's
runtime looks `handler` up in the init phase, and that look-up builds the function (importing the
module builds nothing), so a wrong setting fails init and the models are warm before the first event.
One invocation runs at a time, so batching is `fixed` with no timeout: what one event carries (queue
records, Step Functions items, an object's rows) starts in one event-loop step and is merged into
compiled batches without waiting. An event's kind is told by its shape (event_kind), one method a
kind. What Lambda does as Cloud Run does (a predict body's strict-JSON answer, the results store,
which failures are retried) is written once, in handlers.records and runtime.errors.retryable.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import unquote, unquote_plus

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers
from aws_lambda_powertools.metrics import MetricUnit

from handlers.records import OutputStore, Written, predict_message, write_outcome
from runtime import logs
from runtime.app import App
from runtime.errors import InvalidInput, KilnError, retryable, status_of
from runtime.exchange import Request, Response, whole
from runtime.settings import Settings
from runtime.storage import Storage

if TYPE_CHECKING:  # Powertools' record and S3 helpers are imported by the events that need them (cold start)
    from aws_lambda_powertools.utilities.batch import BatchProcessor
    from aws_lambda_powertools.utilities.data_classes import S3BatchOperationResponseRecord

SERVICE = "kiln"
NAMESPACE = "Kiln"
DEADLINE_MARGIN = 0.25  # seconds kept back from Lambda's deadline to send the answer
PROTOCOL = "lambda"  # the protocol label of everything but HTTP events in Kiln's own metrics
LOGGERS = {"runtime", "handlers", "kiln"}  # Kiln's loggers, written through Powertools' Logger
EXPECTED = (
    "an API Gateway (REST or HTTP API), function URL or ALB request; an SQS, Kinesis or S3 "
    "notification batch (Records); an EventBridge S3 Object Created or Scheduled Event; an S3 "
    "Batch Operations job (invocationSchemaVersion, tasks); a Step Functions item batch (Items); "
    'a TF Serving predict body (instances or inputs); or {"kiln": "warm"}'
)
T = TypeVar("T")


handler: Callable[[Any, Any], Any]  # declared only: __getattr__ makes it on first look-up


def __getattr__(name: str):
    """`handler`, built on first look-up: the Lambda runtime's, during the init phase."""
    if name == "handler":
        global handler
        handler = build(os.environ).handler
        return handler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build(environ: Mapping[str, str]) -> LambdaFunction:
    """The function for this environment: settings checked, models loaded, ready for events."""
    started = time.perf_counter()
    settings = Settings.from_env(environ, batching_mode="fixed")
    service = environ.get("POWERTOOLS_SERVICE_NAME") or SERVICE
    logger = Logger(service=service, level=settings.log_level)
    copy_config_to_registered_loggers(source_logger=logger, include=set(LOGGERS))
    logging.getLogger(service).propagate = False  # once, through Powertools' handler, whatever else the root has
    app = App.start(settings)
    for name in app.repository.names():
        if not app.repository.is_available(name):
            logger.warning("model not available after init", extra={"model": name})
    function = LambdaFunction(
        app,
        settings,
        logger,
        Metrics(namespace=environ.get("POWERTOOLS_METRICS_NAMESPACE") or NAMESPACE, service=service),
        Tracer(service=service),
    )
    logger.info(
        "initialized", extra={"models": app.repository.names(), "init_seconds": round(time.perf_counter() - started, 3)}
    )
    return function


@dataclass
class Invocation:
    """What one invocation is: its event's kind, deadline and Lambda context."""

    kind: str
    deadline: float | None
    context: Any


class LambdaFunction:
    def __init__(self, app: App, settings: Settings, logger: Logger, metrics: Metrics, tracer: Tracer):
        self.app = app
        self.settings = settings
        self.logger = logger
        self.metrics = metrics
        self.tracer = tracer
        self.loop = asyncio.new_event_loop()
        self.outputs = OutputStore(settings.output_prefix)
        handle = tracer.capture_lambda_handler(self._handle, capture_response=False)
        handle = metrics.log_metrics(handle, capture_cold_start_metric=True)
        self.handler = logger.inject_lambda_context(handle, clear_state=True)
        self.kinds: dict[str, Callable[[dict, Invocation], Any]] = {
            "warm": self._warm,
            "http_v1": self._http,
            "http_v2": self._http,
            "alb": self._http,
            "sqs": self._queue,
            "kinesis": self._queue,
            "s3": self._s3_event,
            "s3_eventbridge": self._s3_event,
            "s3_batch": self._s3_batch,
            "items": self._items,
            "predict": self._direct,
        }

    def _handle(self, event: Any, context: Any) -> Any:
        kind = event_kind(event)
        self.logger.append_keys(event_source=kind)
        self.metrics.add_dimension(name="event_source", value=kind)
        self.tracer.put_annotation(key="event_source", value=kind)
        token = logs.request_id.set(getattr(context, "aws_request_id", None) or logs.new_request_id())
        try:
            if kind == "unknown":
                raise InvalidInput(f"unrecognized event: {_described(event)}; expected {EXPECTED}")
            return self.kinds[kind](event, Invocation(kind, _deadline(context), context))
        except BaseException:
            self.metrics.add_metric(name="FailedInvocations", unit=MetricUnit.Count, value=1)
            raise
        finally:
            logs.request_id.reset(token)

    def run(self, work: Awaitable[T]) -> T:
        """Run the invocation's async work on the function's own event loop."""
        return self.loop.run_until_complete(work)

    def _count(self, *, requests: int, predictions: int = 0, errors: int = 0) -> None:
        """Requests (even none: the invocation's metrics are never empty), and those that succeeded
        and failed."""
        self.metrics.add_metric(name="Requests", unit=MetricUnit.Count, value=requests)
        for name, value in (("Predictions", predictions), ("Errors", errors)):
            if value:
                self.metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)

    # Keep-warm ----------------------------------------------------------------------------------

    def _warm(self, event: dict, invocation: Invocation) -> dict:
        self.metrics.add_metric(name="WarmPings", unit=MetricUnit.Count, value=1)
        return {"warm": True, "ready": self.app.ready()}

    # HTTP ---------------------------------------------------------------------------------------

    def _http(self, event: dict, invocation: Invocation) -> dict:
        request, refused = http_request(
            event, invocation.kind, invocation.deadline, getattr(invocation.context, "aws_request_id", None)
        )
        response = self.run(whole(self.app.respond(request, refused)))  # Lambda answers whole bodies
        self._count(
            requests=1,
            predictions=int(request.method == "POST" and response.status < 400),
            errors=int(response.status >= 400),
        )
        return http_response(response, invocation.kind, event)

    # Predict bodies: queue records, Step Functions items, direct invocations ----------------------

    async def predict(self, body: bytes | str | dict, deadline: float | None) -> dict:
        """A TF Serving predict body's response as strict JSON (handlers.records), with "model" and
        "version" added."""
        with self.app.exchange(PROTOCOL, "predict", what="lambda predict", deadline=deadline) as exchange:
            served, response = await predict_message(self.app, body, self.settings.score_model, exchange)
            return {**served, **response}

    def _direct(self, event: dict, invocation: Invocation) -> dict:
        try:
            response = self.run(self.predict(event, invocation.deadline))
        except KilnError as e:
            self._count(requests=1, errors=1)
            return {"error": str(e), "status": status_of(e)[0]}
        except Exception:  # a bug: the caller gets a plain 500, the log gets the traceback
            self.logger.exception("internal error serving a direct invocation")
            self._count(requests=1, errors=1)
            return {"error": "internal error", "status": 500}
        self._count(requests=1, predictions=1)
        return response

    def _items(self, event: dict, invocation: Invocation) -> dict:
        items = event["Items"]
        defaults = event.get("BatchInput") or {}
        if not isinstance(defaults, dict):
            raise InvalidInput(f"BatchInput must be an object, got {type(defaults).__name__}")
        defaults = {key: defaults[key] for key in ("model", "signature_name") if key in defaults}
        bodies = [item if _is_predict_body(item) else {"instances": [item]} for item in items]
        results = self.run(_gather(self.predict({**defaults, **body}, invocation.deadline) for body in bodies))
        failures = [(index, result) for index, result in enumerate(results) if isinstance(result, BaseException)]
        self._count(requests=len(items), predictions=len(items) - len(failures), errors=len(failures))
        if failures:
            first = failures[0][1]
            detail = "; ".join(f"item {index}: {error}" for index, error in failures[:10])
            if not isinstance(first, KilnError):
                raise first
            raise type(first)(f"{len(failures)} of {len(items)} items failed: {detail}")
        return {
            "predictions": [
                result if _is_predict_body(item) else _only_prediction(result) for item, result in zip(items, results)
            ]
        }

    def _queue(self, event: dict, invocation: Invocation) -> Mapping[str, Any]:
        """An SQS or Kinesis batch: every record predicted at once (an SQS FIFO message group's one
        after another), its outcome written to the output prefix (handlers.records.write_outcome),
        the records whose failure may pass reported for Lambda to retry."""
        outputs = self.outputs.open(f"{invocation.kind} events")
        records = event["Records"]
        from aws_lambda_powertools.utilities.batch import SqsFifoPartialProcessor, process_partial_response

        processor = _processor(invocation.kind, records)
        fifo = isinstance(processor, SqsFifoPartialProcessor)
        chains: dict[str, list[dict]] = {}  # run one after another: a FIFO message group, else one record
        for record in records:
            chains.setdefault(
                record["attributes"].get("MessageGroupId", "") if fifo else _record_id(record), []
            ).append(record)
        done = self.run(
            _gather((self._in_order(chain, invocation, outputs) for chain in chains.values()), return_exceptions=False)
        )
        outcomes = {record_id: outcome for chain in done for record_id, outcome in chain.items()}
        for record_id, outcome in outcomes.items():
            error = outcome.error if isinstance(outcome, Written) else outcome
            if isinstance(error, KilnError):  # retried unless written: then it cannot succeed
                retried = not isinstance(outcome, Written)
                self.logger.warning(
                    "record failed", extra={"record": record_id, "error": str(error), "retried": retried}
                )
            elif isinstance(error, BaseException):
                self.logger.error("record failed", extra={"record": record_id}, exc_info=error)
        succeeded = sum(isinstance(outcome, Written) and outcome.error is None for outcome in outcomes.values())
        self._count(requests=len(records), predictions=succeeded, errors=len(records) - succeeded)

        def record_handler(record) -> Any:  # Powertools' record: its outcome, computed above
            outcome = outcomes[_record_id(record.raw_event)]  # never asked for one not run: its group failed
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome.url

        return process_partial_response(
            event=event, record_handler=record_handler, processor=processor, context=invocation.context
        )

    async def _in_order(self, records: list[dict], invocation: Invocation, outputs: Storage) -> dict[str, Any]:
        """Each record's Written or exception, one after another up to the first that raises: the
        rest of a FIFO message group is not run, and Powertools reports it failed with that one."""
        outcomes: dict[str, Any] = {}
        for record in records:
            try:
                outcomes[_record_id(record)] = await self._record(record, invocation, outputs)
            except Exception as e:
                outcomes[_record_id(record)] = e
                break
        return outcomes

    async def _record(self, record: dict, invocation: Invocation, outputs: Storage) -> Written:
        if invocation.kind == "sqs":
            body = record["body"]
            key = f"sqs/{_source_name(record['eventSourceARN'])}/{record['messageId']}"
        else:
            body = base64.b64decode(record["kinesis"]["data"])
            shard, _, sequence = record["eventID"].partition(":")
            key = f"kinesis/{_source_name(record['eventSourceARN'])}/{shard}/{sequence}"
        record_id = {"id": _record_id(record)}

        async def result() -> dict:
            return {**record_id, **await self.predict(body, invocation.deadline)}

        return await write_outcome(outputs, key, result(), record_id)

    # S3 objects ---------------------------------------------------------------------------------

    def _score_all(self, objects: list[tuple[str, str]], invocation: Invocation) -> list:
        """Every object scored at once by runtime.scoring (one already scored, or under the output
        prefix, is skipped); each one's ScoreResult or exception, in order."""
        from runtime import scoring  # imported by the first S3 event: no other invocation needs it

        prefix = self.outputs.url(f"{invocation.kind} events")
        results = self.run(
            _gather(
                scoring.score_object(self.app, f"s3://{bucket}/{key}", prefix, model=self.settings.score_model)
                for bucket, key in objects
            )
        )
        failed = [result for result in results if isinstance(result, BaseException)]
        rows = sum(result.rows for result in results if isinstance(result, scoring.ScoreResult))
        self._count(requests=len(objects), predictions=len(objects) - len(failed), errors=len(failed))
        self.metrics.add_metric(name="ScoredRows", unit=MetricUnit.Count, value=rows)
        for (bucket, key), result in zip(objects, results):
            if isinstance(result, BaseException):
                self.logger.warning(
                    "scoring failed",
                    extra={"source": f"s3://{bucket}/{key}", "error": str(result)},
                    exc_info=None if isinstance(result, KilnError) else result,
                )
            else:
                self.logger.info(
                    "scored",
                    extra={
                        "source": result.source,
                        "output": result.output,
                        "rows": result.rows,
                        "skipped": result.skipped,
                        "errors": result.errors,
                    },
                )
        return results

    def _s3_event(self, event: dict, invocation: Invocation) -> dict:
        from aws_lambda_powertools.utilities.data_classes import S3Event, S3EventBridgeNotificationEvent

        if invocation.kind == "s3_eventbridge":
            detail = S3EventBridgeNotificationEvent(event).detail
            objects = [(detail.bucket.name, detail.object.key)]
        else:
            # Notifications URL-encode keys ("a b.csv" is "a+b.csv"); Powertools' EventBridge detail decodes.
            objects = [
                (record.s3.bucket.name, unquote_plus(record.s3.get_object.key))
                for record in S3Event(event).records
                if record.event_name.startswith("ObjectCreated:")
            ]
        results = self._score_all(objects, invocation)
        transient = [result for result in results if isinstance(result, BaseException) and retryable(result)]
        if transient:  # Lambda retries the event; what was scored is skipped then
            raise transient[0]
        return {
            "results": [_result_dict(f"s3://{bucket}/{key}", result) for (bucket, key), result in zip(objects, results)]
        }

    def _s3_batch(self, event: dict, invocation: Invocation) -> dict:
        from aws_lambda_powertools.utilities.data_classes import S3BatchOperationEvent

        batch = S3BatchOperationEvent(event)
        tasks = list(batch.tasks)
        results = self._score_all([(task.s3_bucket, task.s3_key) for task in tasks], invocation)
        return {
            "invocationSchemaVersion": batch.invocation_schema_version,
            "treatMissingKeysAs": "PermanentFailure",
            "invocationId": batch.invocation_id,
            "results": [_task_result(task.task_id, result).asdict() for task, result in zip(tasks, results)],
        }


def event_kind(event: Any) -> str:
    """Which kind of event this is, by its shape; "unknown" for anything this handler does not take."""
    if not isinstance(event, dict):
        return "unknown"
    records = event.get("Records")
    if isinstance(records, list) and records and isinstance(records[0], dict):
        return {"aws:sqs": "sqs", "aws:kinesis": "kinesis", "aws:s3": "s3"}.get(
            str(records[0].get("eventSource")), "unknown"
        )
    if event.get("kiln") == "warm" or (
        event.get("source") == "aws.events" and event.get("detail-type") == "Scheduled Event"
    ):
        return "warm"
    if event.get("source") == "aws.s3" and event.get("detail-type") == "Object Created":
        return "s3_eventbridge"
    if "invocationSchemaVersion" in event and isinstance(event.get("tasks"), list):
        return "s3_batch"
    context = event.get("requestContext")
    if isinstance(context, dict):
        if "elb" in context:
            return "alb"
        if event.get("version") == "2.0" and "rawPath" in event:
            return "http_v2"  # HTTP API payload 2.0, and function URLs
        if "httpMethod" in event:
            return "http_v1"  # REST API, and HTTP API payload 1.0
    if isinstance(event.get("Items"), list):
        return "items"
    if _is_predict_body(event):
        return "predict"
    return "unknown"


def http_request(
    event: dict, kind: str, deadline: float | None, request_id: str | None
) -> tuple[Request, InvalidInput | None]:
    """The core's request for an API Gateway, function URL or ALB event, and why it cannot be
    taken (a body that is not the base64 the event says it is), if it cannot."""
    if kind == "http_v2":
        context = event["requestContext"]
        method, path = context["http"]["method"], event["rawPath"]
        stage = context.get("stage")
        if stage and stage != "$default" and path.startswith(f"/{stage}/"):
            path = path[len(stage) + 1 :]
        headers = {name.lower(): value for name, value in (event.get("headers") or {}).items()}
        if event.get("cookies"):
            headers["cookie"] = "; ".join(event["cookies"])
    else:
        method, path = event["httpMethod"], event["path"]
        multi = event.get("multiValueHeaders")
        headers = (
            {name.lower(): ", ".join(values) for name, values in multi.items() if values}
            if multi
            else {name.lower(): value for name, value in (event.get("headers") or {}).items()}
        )
    body, refused = event.get("body") or "", None
    try:
        body = base64.b64decode(body, validate=True) if event.get("isBase64Encoded") else body.encode()
    except ValueError:
        body, refused = b"", InvalidInput("the request body is marked base64-encoded, and is not valid base64")
    if request_id and "x-request-id" not in headers:
        headers["x-request-id"] = request_id
    return Request(method.upper(), unquote(path), headers, body, deadline), refused


def http_response(response: Response, kind: str, event: dict) -> dict:
    """The event type's answer: API Gateway's and function URLs' proxy response, or ALB's."""
    content_type = next((value for name, value in response.headers.items() if name.lower() == "content-type"), "")
    text = content_type.startswith("text/") or "json" in content_type
    try:
        body = response.body.decode() if text else None
    except UnicodeDecodeError:
        body = None
    answer: dict[str, Any] = {
        "statusCode": response.status,
        "headers": dict(response.headers),
        "body": body if body is not None else base64.b64encode(response.body).decode(),
        "isBase64Encoded": body is None,
    }
    if kind == "alb":
        answer["statusDescription"] = f"{response.status} {HTTPStatus(response.status).phrase}"
        if event.get("multiValueHeaders") is not None:  # the target group's multi-value headers are on
            answer["multiValueHeaders"] = {name: [value] for name, value in answer.pop("headers").items()}
    return answer


def _deadline(context: Any) -> float | None:
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    if remaining is None:
        return None
    return time.monotonic() + remaining() / 1e3 - DEADLINE_MARGIN


async def _gather(works, *, return_exceptions: bool = True) -> list:
    """Every work's result (or exception), in order; all started in one event-loop step."""
    return await asyncio.gather(*works, return_exceptions=return_exceptions)


def _is_predict_body(value: Any) -> bool:
    return isinstance(value, dict) and ("instances" in value or "inputs" in value)


def _only_prediction(response: dict) -> Any:
    return response["predictions"][0]


def _described(event: Any) -> str:
    if not isinstance(event, dict):
        kinds = {str: "string", list: "array", int: "number", float: "number", bool: "boolean", type(None): "null"}
        return f"a JSON {kinds.get(type(event), type(event).__name__)}, not an object"
    keys = sorted(map(str, event))
    return f"an object with keys {', '.join(keys[:12])}{', ...' if len(keys) > 12 else ''}" if keys else "{}"


def _record_id(record: dict) -> str:
    return record["messageId"] if "messageId" in record else record["eventID"]


def _source_name(arn: str) -> str:
    """A queue's or stream's name from its ARN (arn:aws:sqs:REGION:ACCOUNT:NAME, ...:stream/NAME)."""
    return arn.rpartition(":")[2].rpartition("/")[2]


def _processor(kind: str, records: list[dict]) -> BatchProcessor:
    """Powertools' batch processor for the event; it reports every failed record, never raising
    for a batch that failed whole (that is reported the same way)."""
    from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, SqsFifoPartialProcessor

    processor: BatchProcessor
    if kind == "sqs" and records[0].get("eventSourceARN", "").endswith(".fifo"):
        processor = SqsFifoPartialProcessor(skip_group_on_error=True)
    else:
        processor = BatchProcessor(EventType.SQS if kind == "sqs" else EventType.KinesisDataStreams)
    processor.raise_on_entire_batch_failure = False
    return processor


def _result_dict(source: str, result: Any) -> dict:
    if isinstance(result, BaseException):
        return {
            "source": source,
            "error": str(result) if isinstance(result, KilnError) else "internal error",
            "status": status_of(result)[0],
        }
    return {
        "source": result.source,
        "output": result.output,
        "rows": result.rows,
        "skipped": result.skipped,
        "errors": result.errors,
    }


def _task_result(task_id: str, result: Any) -> S3BatchOperationResponseRecord:
    from aws_lambda_powertools.utilities.data_classes import S3BatchOperationResponseRecord

    if isinstance(result, BaseException):
        code: Literal["TemporaryFailure", "PermanentFailure"] = (
            "TemporaryFailure" if retryable(result) else "PermanentFailure"
        )
        message = str(result) if isinstance(result, KilnError) else f"internal error: {type(result).__name__}"
        return S3BatchOperationResponseRecord(task_id, code, message)
    if result.skipped and not result.output:
        return S3BatchOperationResponseRecord(task_id, "Succeeded", "not scored: the object is under the output prefix")
    what = "already scored" if result.skipped else f"scored {result.rows} rows"
    return S3BatchOperationResponseRecord(task_id, "Succeeded", f"{what} into {result.output}")
