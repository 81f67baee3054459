"""The AWS Lambda handler (handlers.aws_lambda) on the events AWS sends, as AWS documents them
(tests/events/*.json), through the handler function itself. The Lambda service is simulated: a test
calls the handler as Lambda's runtime would, with a context object of the runtime's shape. S3 is
moto's standalone server; the models are the example servables."""

from __future__ import annotations

import base64
import copy
import io
import json
import logging
import struct
import uuid
from urllib.parse import quote_plus
from dataclasses import dataclass, field, replace
from pathlib import Path

import orjson
import pytest

from handlers import aws_lambda
from runtime import logs
from runtime.errors import ConfigError, InvalidInput, ResourceExhausted, StorageError
from runtime.storage import KeyNotFound
from tests.conftest import install_examples, run_python

EVENTS = Path(__file__).parent / "events"
OUTPUT_BUCKET = "kiln-lambda-results"
OUTPUT_PREFIX = f"s3://{OUTPUT_BUCKET}/results"


@dataclass
class LambdaContext:
    """What Lambda's runtime hands a handler with each event."""

    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    function_name: str = "kiln"
    function_version: str = "$LATEST"
    invoked_function_arn: str = "arn:aws:lambda:us-east-2:123456789012:function:kiln"
    memory_limit_in_mb: int = 2048
    log_group_name: str = "/aws/lambda/kiln"
    log_stream_name: str = "2026/01/01/[$LATEST]0123456789abcdef0123456789abcdef"
    remaining_ms: int = 30_000

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


def event(name: str) -> dict:
    return json.loads((EVENTS / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def served(examples, tmp_path_factory) -> Path:
    return install_examples(examples, tmp_path_factory.mktemp("lambda-models"))


@pytest.fixture(scope="module", autouse=True)
def restore_logging():
    """The handler routes Kiln's loggers through Powertools, as it must in Lambda; the other test
    modules of this process get them back as they were."""
    saved = {name: (logger.handlers[:], logger.propagate, logger.level)
             for name in aws_lambda.LOGGERS | {aws_lambda.SERVICE} for logger in [logging.getLogger(name)]}
    yield
    for name, (handlers, propagate, level) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:], logger.propagate, logger.level = handlers, propagate, level


def build(environ: dict) -> aws_lambda.LambdaFunction:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POWERTOOLS_TRACE_DISABLED", "1")
        return aws_lambda.build({"KILN_POLL_SECONDS": "0", **environ})


@pytest.fixture(scope="module")
def function(served):
    """Both example models, half_plus_two the one for S3 objects and records that name none; results
    go to OUTPUT_PREFIX (in moto, for tests that have `outputs`)."""
    function = build({"KILN_MODEL_REPOSITORY": str(served), "KILN_OUTPUT_PREFIX": OUTPUT_PREFIX,
                      "KILN_SCORE_MODEL": "half_plus_two"})
    yield function
    function.app.repository.stop()
    function.loop.close()


@pytest.fixture(scope="module")
def single(served):
    """One model (digits), and no output prefix."""
    function = build({"KILN_MODEL_REPOSITORY": str(served), "KILN_MODEL_NAME": "digits"})
    yield function
    function.app.repository.stop()
    function.loop.close()


@pytest.fixture
def outputs(bucket):
    """boto3 pointed at moto, a fresh input bucket, and the output bucket: (client, input bucket)."""
    client, name = bucket
    try:
        client.create_bucket(Bucket=OUTPUT_BUCKET)
    except (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
        pass
    return client, name


def invoke(function, payload, **context):
    return function.handler(copy.deepcopy(payload), LambdaContext(**context))


def executions(function, model: str) -> tuple[float, float]:
    """(compiled executions, rows) of the model's serving_default so far."""
    labels = {"model": model, "version": "1", "signature": "serving_default"}
    registry = function.app.metrics.registry
    return (registry.get_sample_value("kiln_batch_size_count", labels) or 0,
            registry.get_sample_value("kiln_batch_size_sum", labels) or 0)


def stored(client, prefix: str) -> dict[str, bytes]:
    listing = client.list_objects_v2(Bucket=OUTPUT_BUCKET, Prefix=prefix).get("Contents", [])
    return {item["Key"]: client.get_object(Bucket=OUTPUT_BUCKET, Key=item["Key"])["Body"].read() for item in listing}


# HTTP: API Gateway, function URLs, ALB ------------------------------------------------------------

def test_api_gateway_rest_api_predict(function):
    context = LambdaContext()
    answer = function.handler(event("apigateway_rest_v1"), context)
    assert answer["statusCode"] == 200 and answer["isBase64Encoded"] is False
    assert orjson.loads(answer["body"]) == {"predictions": [2.5, 3.0, 4.5]}
    assert answer["headers"]["Content-Type"] == "application/json"
    assert answer["headers"]["X-Request-Id"] == context.aws_request_id  # the Lambda request id


def test_api_gateway_rest_api_status_errors_and_request_id(function):
    request = event("apigateway_rest_v1") | {"httpMethod": "GET", "path": "/v1/models/digits", "body": None}
    request["multiValueHeaders"]["X-Request-Id"] = ["caller-chosen-id"]
    answer = invoke(function, request)
    assert answer["statusCode"] == 200 and answer["headers"]["X-Request-Id"] == "caller-chosen-id"
    assert orjson.loads(answer["body"])["model_version_status"][0]["state"] == "AVAILABLE"
    answer = invoke(function, request | {"path": "/v1/models/nope"})
    assert answer["statusCode"] == 404 and "nope" in orjson.loads(answer["body"])["error"]
    answer = invoke(function, event("apigateway_rest_v1") | {"body": '{"instances": [1.0'})
    assert answer["statusCode"] == 400 and "malformed JSON" in orjson.loads(answer["body"])["error"]


def test_api_gateway_base64_body(function):
    body = base64.b64encode(b'{"instances": [4.0]}').decode()
    answer = invoke(function, event("apigateway_rest_v1") | {"body": body, "isBase64Encoded": True})
    assert (answer["statusCode"], orjson.loads(answer["body"])) == (200, {"predictions": [4.0]})
    answer = invoke(function, event("apigateway_rest_v1") | {"body": "{not base64}", "isBase64Encoded": True})
    assert answer["statusCode"] == 400 and "not valid base64" in orjson.loads(answer["body"])["error"]


def test_http_api_payload_2(function):
    answer = invoke(function, event("apigateway_http_v2"))
    assert answer["statusCode"] == 200 and orjson.loads(answer["body"]) == {"outputs": [2.5, 3.0, 4.5]}
    # A named stage is in rawPath; the path is percent-decoded as kiln serve's ASGI server does.
    request = event("apigateway_http_v2")
    request["rawPath"] = "/prod/v1/models/half%5Fplus%5Ftwo:predict"
    request["requestContext"]["stage"] = "prod"
    answer = invoke(function, request)
    assert answer["statusCode"] == 200 and orjson.loads(answer["body"]) == {"outputs": [2.5, 3.0, 4.5]}


def test_lambda_deadline_reaches_the_core(function):
    """Less time left than the margin: the predict answers 504 at once instead of running late."""
    answer = invoke(function, event("apigateway_http_v2"), remaining_ms=100)
    assert answer["statusCode"] == 504 and "deadline" in orjson.loads(answer["body"])["error"]


def test_function_url_open_inference_protocol_binary(function):
    """The OIP binary tensor extension: a binary request body (base64 in the event, as function URLs
    send any non-text body) and a binary answer (base64 with isBase64Encoded)."""
    x = [1.0, 2.0, 5.0]
    header = orjson.dumps({"inputs": [{"name": "x", "shape": [3], "datatype": "FP32",
                                       "parameters": {"binary_data_size": 12}}],
                           "outputs": [{"name": "y", "parameters": {"binary_data": True}}]})
    request = event("function_url")
    request["headers"]["inference-header-content-length"] = str(len(header))
    request["body"] = base64.b64encode(header + struct.pack("<3f", *x)).decode()
    answer = invoke(function, request)
    assert answer["statusCode"] == 200 and answer["isBase64Encoded"] is True
    assert answer["headers"]["Content-Type"] == "application/octet-stream"
    body = base64.b64decode(answer["body"])
    length = int(answer["headers"]["Inference-Header-Content-Length"])
    (output,) = orjson.loads(body[:length])["outputs"]
    assert output["name"] == "y" and output["parameters"]["binary_data_size"] == 12
    assert struct.unpack("<3f", body[length:]) == (2.5, 3.0, 4.5)


def test_alb(function):
    answer = invoke(function, event("alb"))
    assert answer["statusCode"] == 200 and answer["statusDescription"] == "200 OK"
    assert answer["isBase64Encoded"] is False and "headers" in answer
    assert orjson.loads(answer["body"])["model_version_status"][0]["version"] == "1"
    answer = invoke(function, event("alb") | {"path": "/v2/models/nope/ready"})
    assert (answer["statusCode"], answer["statusDescription"]) == (404, "404 Not Found")


def test_alb_multi_value_headers(function):
    """A target group with multi-value headers on sends them, and must be answered with them."""
    request = event("alb")
    request["multiValueHeaders"] = {name: [value] for name, value in request.pop("headers").items()}
    request["multiValueHeaders"]["x-request-id"] = ["from-the-client"]
    answer = invoke(function, request)
    assert answer["statusCode"] == 200 and "headers" not in answer
    assert answer["multiValueHeaders"]["X-Request-Id"] == ["from-the-client"]
    assert answer["multiValueHeaders"]["Content-Type"] == ["application/json"]


# Queues: SQS and Kinesis -----------------------------------------------------------------------

def sqs_batch(queue: str) -> dict:
    """The documented batch (two good records), and two poison records that can never succeed: a body
    that is not JSON, and one naming a model that is not served."""
    batch = event("sqs")
    poison = copy.deepcopy(batch["Records"][:2])
    poison[0] |= {"messageId": "6f1e1d6e-0b1c-4a55-9f0a-1c2b3d4e5f60", "body": "not json"}
    poison[1] |= {"messageId": "8c3f0a4d-3e4b-4f6a-8b7c-9d0e1f2a3b4c",
                  "body": '{"model": "nope", "instances": [1.0]}'}
    batch["Records"].insert(1, poison[0])
    batch["Records"].append(poison[1])
    for record in batch["Records"]:
        record["eventSourceARN"] = f"arn:aws:sqs:us-east-2:123456789012:{queue}"
    return batch


def failing(function, monkeypatch, rows: list, error: type = ResourceExhausted) -> list:
    """The app's execute, failing with `error` (one that may pass, by default) for the requests
    whose first input is `rows`; the rows of every request it was asked to run, in order."""
    ran = []
    execute = function.app.execute

    async def spy(handle, signature, inputs, exchange):
        ran.append(next(iter(inputs.values())).tolist())
        if ran[-1] == rows:
            raise error(f"failed on purpose: {rows}")
        return await execute(handle, signature, inputs, exchange)

    monkeypatch.setattr(function.app, "execute", spy)
    return ran


def test_sqs_records_that_cannot_succeed_are_recorded_not_retried(function, outputs, monkeypatch):
    """As Cloud Run's Pub/Sub messages (runtime.errors.retryable, handlers.records.write_outcome): a
    record that would fail again is answered with its error, at MESSAGE_ID.error.json."""
    client, _ = outputs
    queue = f"queue-{uuid.uuid4().hex[:8]}"
    batch = sqs_batch(queue)
    seen_ids = []
    execute = function.app.execute

    async def spy(*args, **kwargs):
        seen_ids.append(logs.request_id.get())
        return await execute(*args, **kwargs)

    monkeypatch.setattr(function.app, "execute", spy)
    before = executions(function, "half_plus_two")
    context = LambdaContext()
    answer = function.handler(copy.deepcopy(batch), context)
    assert answer == {"batchItemFailures": []}
    # The good records ran as one compiled batch of their 3 rows, under the Lambda request id.
    after = executions(function, "half_plus_two")
    assert (after[0] - before[0], after[1] - before[1]) == (1, 3)
    assert seen_ids == [context.aws_request_id] * 2
    results = stored(client, f"results/sqs/{queue}/")
    errors = {key: orjson.loads(results.pop(key)) for key in list(results) if key.endswith(".error.json")}
    assert {key: orjson.loads(value) for key, value in results.items()} == {
        f"results/sqs/{queue}/059f36b4-87a3-44ab-83d2-661975830a7d.json": {
            "id": "059f36b4-87a3-44ab-83d2-661975830a7d", "model": "half_plus_two", "version": "1",
            "predictions": [2.5, 3.0]},
        f"results/sqs/{queue}/2e1424d4-f796-459a-8184-9c92662be6da.json": {
            "id": "2e1424d4-f796-459a-8184-9c92662be6da", "model": "half_plus_two", "version": "1",
            "predictions": [4.5]}}
    poison = {"6f1e1d6e-0b1c-4a55-9f0a-1c2b3d4e5f60": (400, "malformed JSON"),
              "8c3f0a4d-3e4b-4f6a-8b7c-9d0e1f2a3b4c": (404, "'nope' is not served")}
    assert sorted(errors) == sorted(f"results/sqs/{queue}/{message}.error.json" for message in poison)
    for message, (status, expected) in poison.items():
        error = errors[f"results/sqs/{queue}/{message}.error.json"]
        assert (error["id"], error["status"]) == (message, status) and expected in error["error"]
    # Redelivered all the same (after a crash): the same keys, the same contents.
    written = stored(client, f"results/sqs/{queue}/")
    assert invoke(function, batch) == answer
    assert stored(client, f"results/sqs/{queue}/") == written


def test_sqs_partial_batch_failure(function, outputs, monkeypatch):
    """Only the record whose failure may pass is reported, for SQS to deliver again; nothing of it is written."""
    client, _ = outputs
    queue = f"queue-{uuid.uuid4().hex[:8]}"
    batch = sqs_batch(queue)
    failing(function, monkeypatch, [5.0])
    answer = invoke(function, batch)
    assert answer == {"batchItemFailures": [{"itemIdentifier": "2e1424d4-f796-459a-8184-9c92662be6da"}]}
    assert not any("2e1424d4" in key for key in stored(client, f"results/sqs/{queue}/"))


def test_sqs_batch_that_fails_whole_reports_every_record(function, outputs, monkeypatch):
    batch = sqs_batch(f"queue-{uuid.uuid4().hex[:8]}")
    for record in batch["Records"]:
        record["body"] = '{"model": "half_plus_two", "instances": [7.0]}'
    failing(function, monkeypatch, [7.0])
    answer = invoke(function, batch)
    assert answer == {"batchItemFailures": [{"itemIdentifier": r["messageId"]} for r in batch["Records"]]}


def test_sqs_fifo_records_that_cannot_succeed_do_not_stop_their_group(function, outputs):
    """Answered with their error, they are done with: their group goes on in order."""
    client, _ = outputs
    queue = f"queue-{uuid.uuid4().hex[:8]}.fifo"
    batch = sqs_batch(queue)
    for index, record in enumerate(batch["Records"]):
        record["attributes"]["MessageGroupId"] = "a" if index < 3 else "b"
    assert invoke(function, batch) == {"batchItemFailures": []}
    written = sorted(key.rpartition("/")[2] for key in stored(client, f"results/sqs/{queue}/"))
    assert written == sorted(f"{record['messageId']}{'.error' if index % 2 else ''}.json"
                             for index, record in enumerate(batch["Records"]))


def test_kinesis_partial_batch_failure(function, outputs, monkeypatch):
    """A record that cannot succeed is written with its error (retried, it would hold up the shard);
    one whose failure may pass is reported for retry."""
    client, _ = outputs
    stream = f"stream-{uuid.uuid4().hex[:8]}"
    batch = event("kinesis")
    poison = copy.deepcopy(batch["Records"][1])
    poison["kinesis"]["sequenceNumber"] = "49590338271490256608559692540925702759324208523137515619"
    poison["eventID"] = f"shardId-000000000006:{poison['kinesis']['sequenceNumber']}"
    poison["kinesis"]["data"] = base64.b64encode(b'{"instances": [[1.0]]}').decode()  # KILN_SCORE_MODEL's, wrong shape
    batch["Records"].insert(1, poison)
    for record in batch["Records"]:
        record["eventSourceARN"] = f"arn:aws:kinesis:us-east-2:123456789012:stream/{stream}"
    failing(function, monkeypatch, [5.0])  # the last record's
    answer = invoke(function, batch)
    assert answer == {"batchItemFailures": [{"itemIdentifier": batch["Records"][2]["kinesis"]["sequenceNumber"]}]}
    results = stored(client, f"results/kinesis/{stream}/")
    shard = f"results/kinesis/{stream}/shardId-000000000006"
    assert sorted(results) == sorted([f"{shard}/{batch['Records'][0]['kinesis']['sequenceNumber']}.json",
                                      f"{shard}/{poison['kinesis']['sequenceNumber']}.error.json"])
    assert orjson.loads(results[f"{shard}/{batch['Records'][0]['kinesis']['sequenceNumber']}.json"])["predictions"] \
        == [2.5, 3.0]
    assert orjson.loads(results[f"{shard}/{poison['kinesis']['sequenceNumber']}.error.json"])["status"] == 400
    assert invoke(function, batch) == answer
    assert stored(client, f"results/kinesis/{stream}/") == results


def test_queue_records_are_retried_as_cloud_run_redelivers(function, outputs, monkeypatch):
    """One rule for both clouds (runtime.errors.retryable): the same failures as test_cloud_run's Pub/Sub messages."""
    from runtime import errors
    from tests.test_cloud_run import RETRIED

    batch = sqs_batch(f"queue-{uuid.uuid4().hex[:8]}")
    batch["Records"] = batch["Records"][2:3]  # [5.0]
    retried = {}
    for name in RETRIED:
        failing(function, monkeypatch, [5.0], getattr(errors, name))
        retried[name] = invoke(function, batch)["batchItemFailures"] != []
    assert retried == RETRIED


def test_queue_records_need_an_output_prefix(single):
    with pytest.raises(ConfigError, match="KILN_OUTPUT_PREFIX is not set"):
        invoke(single, event("sqs"))


# S3 objects -------------------------------------------------------------------------------------

def s3_notification(bucket: str, key: str) -> dict:
    """The documented notification, for this object (its key URL-encoded, as S3 sends it)."""
    notification = event("s3_object_created")
    notification["Records"][0]["s3"]["bucket"] |= {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"}
    notification["Records"][0]["s3"]["object"]["key"] = quote_plus(key, safe="/")
    return notification


def test_s3_object_created_scores_and_a_rerun_changes_nothing(function, outputs):
    client, name = outputs
    key = "inputs/batch of rows.jsonl"  # the event has it URL-encoded: inputs/batch+of+rows.jsonl
    client.put_object(Bucket=name, Key=key, Body=b"1.0\n2.0\n5.0\n")
    notification = s3_notification(name, key)
    assert notification["Records"][0]["s3"]["object"]["key"] == event("s3_object_created")["Records"][0]["s3"][
        "object"]["key"]
    answer = invoke(function, notification)
    (result,) = answer["results"]
    assert result | {"output": ""} == {"source": f"s3://{name}/{key}", "output": "", "rows": 3, "skipped": False,
                                       "errors": 0}
    directory = f"results/{name}/{key}.predictions/"
    assert result["output"] == f"{OUTPUT_PREFIX}/{name}/{key}.predictions/manifest.json"
    written = stored(client, directory)
    (part,) = [value for path, value in written.items() if "/part-" in path]
    assert [orjson.loads(line) for line in part.splitlines()] == [
        {"row": 0, "predictions": 2.5}, {"row": 1, "predictions": 3.0}, {"row": 2, "predictions": 4.5}]
    # The same event again (Lambda retries, S3 delivers twice): nothing is scored or written again.
    again = invoke(function, notification)
    assert again["results"][0]["skipped"] is True and again["results"][0]["output"] == result["output"]
    assert stored(client, directory) == written


def test_s3_event_for_a_result_object_scores_nothing(function, outputs):
    """Results written to the triggering bucket must not trigger themselves."""
    client, _ = outputs
    client.put_object(Bucket=OUTPUT_BUCKET, Key="results/x.jsonl", Body=b"1.0\n")
    assert invoke(function, s3_notification(OUTPUT_BUCKET, "results/x.jsonl"))["results"][0] | {"source": ""} == {
        "source": "", "output": "", "rows": 0, "skipped": True, "errors": 0}


def test_s3_event_with_bad_data_is_answered_not_retried(function, outputs):
    client, name = outputs
    client.put_object(Bucket=name, Key="inputs/notes.txt", Body=b"hello")
    (result,) = invoke(function, s3_notification(name, "inputs/notes.txt"))["results"]
    assert result["status"] == 400 and ".jsonl" in result["error"]


def test_eventbridge_s3_object_created(function, outputs):
    client, name = outputs
    client.put_object(Bucket=name, Key="inputs/rows.csv", Body=b"x\n1.0\n3.0\n")
    notification = event("s3_eventbridge_object_created")
    notification["detail"]["bucket"]["name"] = name
    (result,) = invoke(function, notification)["results"]
    assert (result["rows"], result["skipped"], result["errors"]) == (2, False, 0)


@pytest.mark.parametrize("schema", ["1.0", "2.0"])
def test_s3_batch_operations(function, outputs, schema):
    client, name = outputs
    client.put_object(Bucket=name, Key="inputs/rows.jsonl", Body=b"1.0\n2.0\n5.0\n")
    job = event(f"s3_batch_operations_{schema}")
    task = job["tasks"][0]
    if schema == "1.0":
        task["s3BucketArn"] = f"arn:aws:s3:::{name}"
    else:
        task["s3Bucket"] = name
    job["tasks"].append(task | {"taskId": "bWlzc2luZwo=", "s3Key": "inputs/missing.jsonl"})
    answer = invoke(function, job)
    output = f"{OUTPUT_PREFIX}/{name}/inputs/rows.jsonl.predictions/manifest.json"
    assert answer == {"invocationSchemaVersion": schema, "treatMissingKeysAs": "PermanentFailure",
                      "invocationId": job["invocationId"], "results": [
                          {"taskId": "dGFza2lkZ29lc2hlcmUK", "resultCode": "Succeeded",
                           "resultString": f"scored 3 rows into {output}"},
                          {"taskId": "bWlzc2luZwo=", "resultCode": "PermanentFailure",
                           "resultString": answer["results"][1]["resultString"]}]}
    assert "missing.jsonl" in answer["results"][1]["resultString"]
    assert invoke(function, job)["results"][0]["resultString"] == f"already scored into {output}"


def test_s3_batch_operations_result_codes():
    """Failures that may pass are S3's TemporaryFailure (it retries them); bad data is permanent."""
    assert aws_lambda._task_result("t", StorageError("throttled")).result_code == "TemporaryFailure"
    assert aws_lambda._task_result("t", KeyNotFound("gone")).result_code == "PermanentFailure"
    assert aws_lambda._task_result("t", InvalidInput("bad")).result_code == "PermanentFailure"
    assert aws_lambda._task_result("t", RuntimeError("bug")).result_code == "TemporaryFailure"


# Step Functions, direct invocation, keep-warm, malformed events --------------------------------

def test_step_functions_item_batch(function):
    before = executions(function, "half_plus_two")
    answer = invoke(function, event("stepfunctions_item_batch"))
    assert answer == {"predictions": [2.5, 3.0, {"model": "half_plus_two", "version": "1",
                                                 "predictions": [4.5, 5.5]}, 0.5]}
    after = executions(function, "half_plus_two")
    assert (after[0] - before[0], after[1] - before[1]) == (1, 5)  # one compiled batch for all items
    items = event("stepfunctions_item_batch")
    items["Items"][1] = "two"
    with pytest.raises(InvalidInput, match=r"1 of 4 items failed: item 1: "):
        invoke(function, items)


def test_direct_invocation(function, single, monkeypatch):
    assert invoke(function, {"model": "digits", "instances": [[[[0.0]] * 28] * 28]})["model"] == "digits"
    assert invoke(function, {"instances": [1.0]}) == {"model": "half_plus_two", "version": "1",
                                                      "predictions": [2.5]}  # KILN_SCORE_MODEL's
    answer = invoke(single, {"inputs": {"images": [[[[0.0]] * 28] * 28]}})  # the only model
    assert answer["model"] == "digits" and len(answer["outputs"][0]) == 10
    assert invoke(function, {"model": "nope", "instances": [1.0]}) == {
        "error": "model 'nope' is not served; served: digits, half_plus_two", "status": 404}
    answer = invoke(function, {"model": "half_plus_two", "signature_name": "nope", "instances": [1.0]})
    assert answer["status"] == 400 and "nope" in answer["error"]
    monkeypatch.setattr(function, "settings", replace(function.settings, score_model=None))
    answer = invoke(function, {"instances": [1.0]})
    assert answer["status"] == 400 and "several models are served" in answer["error"]


@pytest.mark.parametrize("ping", [event("eventbridge_scheduled"), {"kiln": "warm"}])
def test_keep_warm_does_no_model_work(function, monkeypatch, ping):
    async def no_model_work(*args, **kwargs):
        raise AssertionError("a keep-warm ping ran model work")

    monkeypatch.setattr(function.app, "execute", no_model_work)
    before = executions(function, "half_plus_two"), executions(function, "digits")
    assert invoke(function, ping) == {"warm": True, "ready": True}
    assert (executions(function, "half_plus_two"), executions(function, "digits")) == before


@pytest.mark.parametrize("payload", [{"hello": "world"}, "instances", [1.0, 2.0], {"Records": []}])
def test_malformed_event_gets_a_clear_error(function, payload):
    with pytest.raises(InvalidInput, match="unrecognized event: .*; expected an API Gateway"):
        invoke(function, payload)


def test_metrics_in_embedded_metric_format_with_cold_start(function, capsys):
    from aws_lambda_powertools.metrics.provider.cold_start import reset_cold_start_flag

    reset_cold_start_flag()
    capsys.readouterr()
    invoke(function, {"model": "half_plus_two", "instances": [1.0]})
    lines = [orjson.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    emf = [line for line in lines if "_aws" in line]
    (cold,) = [line for line in emf if "ColdStart" in line]
    assert cold["function_name"] == "kiln"
    (metrics,) = [line for line in emf if "Predictions" in line]
    assert metrics["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "Kiln"
    assert (metrics["event_source"], metrics["service"], metrics["Requests"], metrics["Predictions"]) == \
        ("predict", "kiln", [1.0], [1.0])


def test_logs_are_json_with_the_lambda_request_id(function, outputs, monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(function.logger.registered_handler, "stream", stream)
    context = LambdaContext()
    function.handler(sqs_batch("logged") | {"Records": sqs_batch("logged")["Records"][1:2]}, context)
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    (failed,) = [line for line in lines if line.get("message") == "record failed"]
    assert failed["function_request_id"] == context.aws_request_id and failed["service"] == "kiln"
    assert failed["event_source"] == "sqs" and "malformed JSON" in failed["error"] and failed["retried"] is False


# NaN and Infinity: TF Serving's bare tokens in HTTP bodies, strings in every JSON result -----------

NON_FINITE_INPUTS = "[NaN, Infinity, -Infinity, 1.0]"  # half_plus_two: y = x / 2 + 2 keeps them
NON_FINITE = ["NaN", "Infinity", "-Infinity", 2.5]  # as Lambda's JSON results write them


def strict_json(value) -> object:
    """The value as strict JSON (Lambda's and Step Functions' JSON) reads it back."""
    return json.loads(json.dumps(value, allow_nan=False))


def test_non_finite_predictions_over_http_keep_tf_servings_tokens(function):
    for kind in ("apigateway_rest_v1", "apigateway_http_v2", "alb"):
        request = event(kind) | {"body": f'{{"instances": {NON_FINITE_INPUTS}}}', "isBase64Encoded": False}
        if kind == "alb":
            request |= {"httpMethod": "POST", "path": "/v1/models/half_plus_two:predict"}
        answer = invoke(function, request)
        assert (answer["statusCode"], answer["body"]) == (200, '{"predictions":[NaN,Infinity,-Infinity,2.5]}'), kind


def test_non_finite_predictions_in_direct_and_step_functions_results(function):
    nan, inf = float("nan"), float("inf")
    answer = invoke(function, {"instances": [nan, inf, -inf, 1.0]})  # the Python runtime reads bare NaN
    assert strict_json(answer) == {"model": "half_plus_two", "version": "1", "predictions": NON_FINITE}
    answer = invoke(function, {"inputs": {"x": [nan, 1.0]}})
    assert strict_json(answer)["outputs"] == ["NaN", 2.5]
    answer = invoke(function, {"Items": [nan, inf, 1.0, {"instances": [-inf, 1.0]}],
                               "BatchInput": {"model": "half_plus_two"}})
    assert strict_json(answer) == {"predictions": ["NaN", "Infinity", 2.5, {
        "model": "half_plus_two", "version": "1", "predictions": ["-Infinity", 2.5]}]}


@pytest.mark.parametrize("queue", ["queue", "queue.fifo"])
def test_non_finite_predictions_in_sqs_results(function, outputs, queue):
    client, _ = outputs
    queue = f"{queue.partition('.')[0]}-{uuid.uuid4().hex[:8]}{'.fifo' if queue.endswith('fifo') else ''}"
    batch = sqs_batch(queue)
    batch["Records"] = batch["Records"][:1]
    batch["Records"][0]["body"] = f'{{"instances": {NON_FINITE_INPUTS}}}'
    batch["Records"][0]["attributes"]["MessageGroupId"] = "a"
    assert invoke(function, batch) == {"batchItemFailures": []}
    (written,) = stored(client, f"results/sqs/{queue}/").values()
    assert orjson.loads(written)["predictions"] == NON_FINITE


def test_non_finite_predictions_in_kinesis_results(function, outputs):
    client, _ = outputs
    stream = f"stream-{uuid.uuid4().hex[:8]}"
    batch = event("kinesis")
    for record in batch["Records"]:
        record["eventSourceARN"] = f"arn:aws:kinesis:us-east-2:123456789012:stream/{stream}"
        record["kinesis"]["data"] = base64.b64encode(f'{{"instances": {NON_FINITE_INPUTS}}}'.encode()).decode()
    assert invoke(function, batch) == {"batchItemFailures": []}
    results = stored(client, f"results/kinesis/{stream}/")
    assert [orjson.loads(value)["predictions"] for value in results.values()] == [NON_FINITE] * len(batch["Records"])


def test_non_finite_predictions_in_s3_object_results(function, outputs):
    client, name = outputs
    client.put_object(Bucket=name, Key="inputs/special.jsonl", Body=b"NaN\nInfinity\n-Infinity\n1.0\n")
    (result,) = invoke(function, s3_notification(name, "inputs/special.jsonl"))["results"]
    assert (result["rows"], result["errors"]) == (4, 0)
    (part,) = [value for key, value in stored(client, f"results/{name}/inputs/special.jsonl.predictions/").items()
               if "/part-" in key]
    assert [orjson.loads(line)["predictions"] for line in part.splitlines()] == NON_FINITE


# SQS FIFO: a message group's side effects in its order ----------------------------------------

def test_sqs_fifo_stops_a_message_group_at_its_first_failure(function, outputs, monkeypatch):
    """Group a's second record fails in a way that may pass: its third is neither run nor written,
    and both are reported for retry, so that they come back in order; group b goes on."""
    client, _ = outputs
    queue = f"queue-{uuid.uuid4().hex[:8]}.fifo"
    batch = sqs_batch(queue)
    template = batch["Records"][0]
    records = []
    for index, (group, body) in enumerate([("a", "[1.0]"), ("b", "[10.0]"), ("a", "[2.0]"), ("a", "[3.0]"),
                                           ("b", "[12.0]")]):
        record = copy.deepcopy(template)
        record["messageId"] = f"message-{index}"
        record["body"] = f'{{"instances": {body}}}'
        record["attributes"]["MessageGroupId"] = group
        records.append(record)
    batch["Records"] = records
    ran = failing(function, monkeypatch, [2.0])
    answer = invoke(function, batch)
    assert answer == {"batchItemFailures": [{"itemIdentifier": "message-2"}, {"itemIdentifier": "message-3"}]}
    assert [2.0] in ran and [3.0] not in ran  # message-3 came after message-2's failure: never run
    written = {key.rpartition("/")[2]: orjson.loads(value)["predictions"]
               for key, value in stored(client, f"results/sqs/{queue}/").items()}
    assert written == {"message-0.json": [2.5], "message-1.json": [7.0], "message-4.json": [8.0]}


# The init phase, in a fresh interpreter as Lambda's runtime runs it -------------------------------

INIT = """
import importlib, json, sys, time
started = time.perf_counter()
module = importlib.import_module("handlers.aws_lambda")  # what Lambda's runtime does in init
imported = time.perf_counter() - started
try:
    handler = getattr(module, "handler")
except Exception as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
    sys.exit(0)
initialized = time.perf_counter() - started

class Context:
    aws_request_id, function_name, memory_limit_in_mb = "req-1", "kiln", 2048
    invoked_function_arn = "arn:aws:lambda:us-east-2:123456789012:function:kiln"
    def get_remaining_time_in_millis(self):
        return 3000

answer = handler({"instances": [[[[0.5]] * 28] * 28]}, Context())
print(json.dumps({"import_s": imported, "init_s": initialized, "tensorflow": "tensorflow" in sys.modules,
                  "scoring": "runtime.scoring" in sys.modules,
                  "record batches": "aws_lambda_powertools.utilities.batch" in sys.modules, "classes": len(answer["predictions"][0])}))
"""


def run_init(env: dict) -> dict:
    result = run_python(INIT, env={"POWERTOOLS_TRACE_DISABLED": "1", "KILN_MODEL_CONFIG_FILE": "", **env})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("env, message", [
    ({"KILN_POLL_SECONDS": "soon"}, "KILN_POLL_SECONDS must be a number, got 'soon'"),
    ({"KILN_MAX_BATCH_SIZE": "lots"}, "KILN_MAX_BATCH_SIZE must be an integer, got 'lots'"),
    ({"KILN_MODEL_REPOSITORY": "", "KILN_MODEL_NAME": ""}, "no models to serve: set KILN_MODEL_CONFIG_FILE"),
])
def test_a_bad_setting_fails_init_naming_it(served, env, message):
    answer = run_init({"KILN_MODEL_REPOSITORY": str(served), "KILN_MODEL_NAME": "digits", **env})
    assert answer["error"] == "ConfigError" and message in answer["message"]


def test_init_loads_the_models_without_tensorflow(served):
    """Importing and initializing the handler never imports TensorFlow (digits is all XLA AOT), nor
    batch scoring or Powertools' record batches (about 25 ms) before an S3 event or a record needs
    them (import time is cold start)."""
    answer = run_init({"KILN_MODEL_REPOSITORY": str(served), "KILN_MODEL_NAME": "digits"})
    assert answer["tensorflow"] is False and answer["scoring"] is False and answer["classes"] == 10
    assert answer["record batches"] is False
    print(f"import {answer['import_s']:.3f} s, init (import + models loaded) {answer['init_s']:.3f} s")
