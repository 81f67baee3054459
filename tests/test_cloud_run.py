"""The Cloud Run service on the real functions-framework server (ASGI mode, started on loopback as
Cloud Run starts it) called over HTTP, the events Google posts to it, and the Cloud Run Jobs entry point.

The events are Google's own published examples (tests/events/gcp_*.json): the Pub/Sub push body of
Pub/Sub's push documentation, and the messagePublished and object.v1.finalized CloudEvents of
GoogleCloudPlatform/functions-framework-conformance (events/generate/data); the tests change only the
ids, the message data and the bucket and object names. Eventarc delivers in binary content mode
(ce-* headers, the data as the body); structured mode is tested too.

Cloud Storage is moto's S3 server standing in for GCS's S3-interoperable XML API: gs:// URLs go to
KILN_GCS_ENDPOINT_URL, pointed at moto here (https://storage.googleapis.com in production).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import boto3
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, free_port, install_examples, stop, wait_until_up

EVENTS = Path(__file__).parent / "events"
IMAGE = [[[0.5]] * 28] * 28
MOTO_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def event(name: str) -> dict:
    return json.loads((EVENTS / name).read_text())


@pytest.fixture(scope="module")
def gcs(s3_endpoint):
    """A bucket in moto, reached as GCS would be (boto3 at the interoperable endpoint); (client, name)."""
    client = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    name = f"kiln-gcs-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return client, name


def kiln_env(tmp: Path, endpoint: str, **extra: str) -> dict:
    """The environment of a Kiln process on Cloud Run here: KILN_* settings, and boto3 pointed at moto
    with nothing from this machine's own AWS configuration."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "KILN_", "CLOUD_RUN_", "FUNCTION_"))}
    return {**env, **MOTO_ENV, "AWS_CONFIG_FILE": str(tmp / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials"), "KILN_GCS_ENDPOINT_URL": endpoint,
            "PYTHONPATH": str(ROOT), **extra}


def functions_framework(port: int, env: dict, log: Path) -> subprocess.Popen:
    """`functions-framework --asgi --source handlers/cloud_run.py --target serve`, as the container runs it."""
    script = Path(sys.executable).with_name("functions-framework")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "functions_framework"]
    return subprocess.Popen([*command, "--asgi", "--source", "handlers/cloud_run.py", "--target", "serve",
                             "--host", "127.0.0.1", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def service(examples, gcs, s3_endpoint, tmp_path_factory):
    """The service over half_plus_two and digits, results to gs://BUCKET/results; yields its URL."""
    _, bucket = gcs
    tmp = tmp_path_factory.mktemp("cloud_run")
    install_examples(examples, tmp / "models")
    port, log = free_port(), tmp / "service.log"
    process = functions_framework(port, kiln_env(tmp, s3_endpoint, KILN_MODEL_REPOSITORY=str(tmp / "models"),
                                                 KILN_OUTPUT_PREFIX=f"gs://{bucket}/results",
                                                 KILN_SCORE_MODEL="half_plus_two"), log)
    url = f"http://127.0.0.1:{port}"
    # As a Cloud Run startup probe on readiness would.
    wait_until_up(process, lambda: httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200, log,
                  "functions-framework")
    try:
        yield url
    finally:
        stop(process)


def scrape(url: str) -> dict:
    response = httpx.get(f"{url}/metrics")
    assert response.status_code == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def read_object(gcs, key: str) -> bytes:
    client, bucket = gcs
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


# The REST APIs ---------------------------------------------------------------------------------

def test_the_core_rest_apis_over_functions_framework(service):
    predict = httpx.post(f"{service}/v1/models/half_plus_two:predict", json={"instances": [1.0, 2.0, 5.0]},
                         headers={"X-Request-Id": "req-1"})
    assert predict.status_code == 200 and predict.json() == {"predictions": [2.5, 3.0, 4.5]}
    assert predict.headers["x-request-id"] == "req-1"
    columnar = httpx.post(f"{service}/v1/models/digits/versions/1:predict", json={"inputs": [IMAGE, IMAGE]})
    assert columnar.status_code == 200 and len(columnar.json()["outputs"]) == 2
    status = httpx.get(f"{service}/v1/models/digits").json()
    assert status["model_version_status"][0]["state"] == "AVAILABLE"
    metadata = httpx.get(f"{service}/v1/models/digits/metadata").json()
    assert "serving_default" in metadata["metadata"]["signature_def"]["signature_def"]
    assert {m["name"] for m in httpx.get(f"{service}/v1/models").json()["models"]} == {"half_plus_two", "digits"}
    infer = httpx.post(f"{service}/v2/models/digits/infer", json={"inputs": [
        {"name": "images", "shape": [1, 28, 28, 1], "datatype": "FP32", "data": [0.5] * 784}]})
    assert infer.status_code == 200 and infer.json()["model_name"] == "digits"
    assert httpx.get(f"{service}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{service}/v2/models/digits/ready").status_code == 200
    assert httpx.get(f"{service}/v2").json()["name"] == "kiln"
    # The core's errors, as TF Serving answers them.
    missing = httpx.post(f"{service}/v1/models/nope:predict", json={"instances": [1.0]})
    assert missing.status_code == 404 and "nope" in missing.json()["error"]
    bad = httpx.post(f"{service}/v1/models/half_plus_two:predict", json={"instances": "x"})
    assert bad.status_code == 400 and "error" in bad.json()
    assert httpx.get(f"{service}/no/such/path").status_code == 404
    assert "kiln_cold_start_seconds" in httpx.get(f"{service}/monitoring/prometheus/metrics").text


def test_concurrent_requests_are_merged_by_the_batcher(service):
    """Adaptive batching is on by default: requests that arrive together run as one batch."""
    requests = 48
    batch = {"model": "digits", "version": "1", "signature": "serving_default"}
    before = scrape(service)

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=requests)) as client:
            return await asyncio.gather(*(client.post(f"{service}/v1/models/digits:predict",
                                                      json={"instances": [IMAGE]}) for _ in range(requests)))

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 and len(r.json()["predictions"]) == 1 for r in responses)
    after = scrape(service)

    def delta(name: str) -> float:
        key = (name, frozenset(batch.items()))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("kiln_batch_size_sum") == requests  # every row ran once
    assert delta("kiln_batch_size_count") < requests  # in fewer batches than requests


def test_the_service_runs_a_worker_per_cpu_and_metrics_sum_over_them(service):
    """WORKERS defaults to the CPUs (handlers.cloud_run): gunicorn's master forks one worker each,
    and whichever answers a scrape reports every worker's requests."""
    import psutil

    master = next(p for p in psutil.process_iter(["cmdline"]) if f"--port {service.rpartition(':')[2]}"
                  in " ".join(p.info["cmdline"] or ()) and "functions" in " ".join(p.info["cmdline"] or ()))
    assert len(master.children()) == len(os.sched_getaffinity(0))
    key = ("kiln_requests_total", frozenset({"model": "half_plus_two", "version": "1", "api": "predict",
                                             "protocol": "rest", "status": "200"}.items()))
    before = scrape(service).get(key, 0.0)
    for _ in range(20):  # a fresh connection each: gunicorn's workers share its socket
        assert httpx.post(f"{service}/v1/models/half_plus_two:predict", json={"instances": [1.0]}).status_code == 200
    assert all(scrape(service).get(key, 0.0) - before == 20 for _ in range(6))


# Pub/Sub ---------------------------------------------------------------------------------------

def pubsub_push(payload: bytes, message_id: str | None = None) -> tuple[dict, str]:
    """Pub/Sub's documented push body with this data (and a fresh message id)."""
    body = event("gcp_pubsub_push.json")
    message_id = message_id or str(uuid.uuid4().int)[:16]
    body["message"].update(data=base64.b64encode(payload).decode(), messageId=message_id, message_id=message_id)
    return body, message_id


def binary_mode(cloud_event: dict) -> tuple[dict, bytes]:
    """A structured CloudEvent as Eventarc posts it: attributes as ce-* headers, the data as the body."""
    headers = {f"ce-{key}": value for key, value in cloud_event.items() if key not in ("data", "datacontenttype")}
    headers["content-type"] = cloud_event.get("datacontenttype", "application/json")
    return headers, json.dumps(cloud_event["data"]).encode()


def test_pubsub_push_writes_the_prediction_keyed_by_message_id(service, gcs):
    body, message_id = pubsub_push(b'{"model": "half_plus_two", "instances": [1.0, 2.0, 5.0]}')
    answer = httpx.post(f"{service}/", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "scored" and answer.headers["x-request-id"] == message_id
    key = f"results/{message_id}.json"
    assert answer.json()["output"] == f"gs://{gcs[1]}/{key}"
    assert json.loads(read_object(gcs, key)) == {"predictions": [2.5, 3.0, 4.5]}
    # Without "model": KILN_SCORE_MODEL's (half_plus_two here; with one model served, that one).
    body_without, other_id = pubsub_push(b'{"instances": [7.0]}')
    assert httpx.post(f"{service}/", json=body_without).json()["status"] == "scored"
    assert json.loads(read_object(gcs, f"results/{other_id}.json")) == {"predictions": [5.5]}
    written = gcs[0].head_object(Bucket=gcs[1], Key=key)["ETag"]
    # Pub/Sub delivers at least once: a redelivery is acknowledged, not run again.
    again = httpx.post(f"{service}/", json={**body, "deliveryAttempt": 2})
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    assert gcs[0].head_object(Bucket=gcs[1], Key=key)["ETag"] == written
    counted = scrape(service)
    assert counted[("kiln_requests_total", frozenset({"protocol": "event", "api": "pubsub", "model": "half_plus_two",
                                                       "version": "1", "status": "200"}.items()))] >= 1


def test_pubsub_results_are_strict_json_with_nan_and_infinity_as_strings(service, gcs):
    """As the Lambda handler's results: readable by strict JSON parsers (HTTP bodies keep bare NaN)."""
    body, message_id = pubsub_push(b'{"instances": [NaN, Infinity, -Infinity, 0.1]}')
    assert httpx.post(f"{service}/", json=body).json()["status"] == "scored"
    assert read_object(gcs, f"results/{message_id}.json") == b'{"predictions":["NaN","Infinity","-Infinity",2.05]}'


def test_pubsub_cloudevents_in_binary_and_structured_mode(service, gcs):
    for mode in ("binary", "structured"):
        cloud_event = event("gcp_pubsub_message_published.json")
        message_id = f"{mode}-{uuid.uuid4().hex[:8]}"
        cloud_event["id"] = message_id
        cloud_event["data"]["message"].update(messageId=message_id, data=base64.b64encode(
            json.dumps({"model": "digits", "inputs": {"images": [IMAGE]}}).encode()).decode())
        if mode == "binary":
            headers, content = binary_mode(cloud_event)
        else:
            headers, content = {"content-type": "application/cloudevents+json"}, json.dumps(cloud_event).encode()
        answer = httpx.post(f"{service}/", headers=headers, content=content)
        assert answer.status_code == 200 and answer.json()["status"] == "scored", answer.text
        assert len(json.loads(read_object(gcs, f"results/{message_id}.json"))["outputs"]) == 1


def test_a_poison_message_is_acknowledged_and_its_error_recorded(service, gcs):
    """Pub/Sub redelivers until a 2xx: a message that can never succeed is acknowledged, and its
    error logged and stored beside the results, so it does not come back for days."""
    # Google's own example message: "test message 3" is no predict request.
    headers, content = binary_mode(event("gcp_pubsub_message_published.json"))
    message_id = json.loads(content)["message"]["messageId"]
    gcs[0].delete_object(Bucket=gcs[1], Key=f"results/{message_id}.error.json")
    answer = httpx.post(f"{service}/", headers=headers, content=content)
    assert answer.status_code == 200 and answer.json()["status"] == "failed"
    assert "JSON" in answer.json()["error"]
    record = json.loads(read_object(gcs, f"results/{message_id}.error.json"))
    assert record["message_id"] == message_id and record["status"] == 400 and "JSON" in record["error"]
    assert record["subscription"] == "projects/sample-project/subscriptions/sample-subscription"
    again = httpx.post(f"{service}/", headers=headers, content=content)
    assert again.json()["status"] == "duplicate"
    for payload, expected in ((b'{"model": "nope", "instances": [1.0]}', "'nope' is not served"),
                              (b'{"model": 3, "instances": [1.0]}', "'model' must be a model's name"),
                              (b'{"model": "half_plus_two", "instances": [[1.0, 2.0]]}', "shape"),
                              (b"\xff not base64 at all", "not base64")):
        body, message_id = pubsub_push(payload)
        if expected == "not base64":
            body["message"]["data"] = "%%%"
        answer = httpx.post(f"{service}/", json=body)
        assert answer.status_code == 200 and answer.json()["status"] == "failed", answer.text
        assert expected in answer.json()["error"]
        assert expected in json.loads(read_object(gcs, f"results/{message_id}.error.json"))["error"]


RETRY = """
import asyncio, json, sys
from handlers.cloud_run import SETTINGS, CloudRunApp
from handlers.gcp_events import PubsubDelivery
from runtime import errors
from runtime.exchange import Exchange


async def decide(name):
    service = CloudRunApp(None, SETTINGS)  # a message's failure needs no App

    async def fail(payload, exchange):
        raise getattr(errors, name)("failed")

    service._predict = fail
    delivery = PubsubDelivery.parse({"message": {"data": "", "messageId": name}})
    try:
        return json.loads((await service._pubsub(delivery, Exchange("event"))).body)["status"]
    except errors.KilnError:
        return "redelivered"

print(json.dumps({name: asyncio.run(decide(name)) for name in sys.argv[1:]}))
"""
RETRIED = {"SessionConflict": True, "StorageError": True, "DeadlineExceeded": True, "ResourceExhausted": True,
           "Unsupported": False, "InvalidInput": False, "NotFound": False, "ConfigError": False,
           "PermissionDenied": False}


def test_lambda_and_cloud_run_retry_the_same_failures(tmp_path):
    """One rule (runtime.errors.retryable): 409, a session conflict, may pass; 501 will not."""
    from handlers.aws_lambda import _task_result
    from runtime import errors

    done = subprocess.run([sys.executable, "-c", RETRY, *RETRIED], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "KILN_MODEL_REPOSITORY": str(tmp_path),
                               "KILN_OUTPUT_PREFIX": str(tmp_path / "results")}, timeout=120)
    assert done.returncode == 0, done.stderr
    cloud_run = {name: status == "redelivered" for name, status in json.loads(done.stdout).items()}
    aws_lambda = {name: _task_result("t", getattr(errors, name)("failed")).result_code == "TemporaryFailure"
                  for name in RETRIED}
    assert cloud_run == aws_lambda == RETRIED


def test_malformed_events_get_a_clear_400(service):
    published = event("gcp_pubsub_message_published.json")
    headers, content = binary_mode(published)
    cases = [
        ({}, b"not json", "not JSON"),
        ({}, b"[1, 2]", "expected a Pub/Sub push message"),
        ({}, b'{"instances": [1.0]}', "expected a Pub/Sub push message"),
        ({}, b'{"message": {"data": "eyJ9"}}', "messageId"),
        ({}, b'{"message": {"messageId": "../../etc"}, "subscription": "s"}', "messageId"),
        ({**headers, "ce-type": "google.cloud.storage.object.v1.deleted"}, content, "not 'google.cloud.storage"),
        ({k: v for k, v in headers.items() if k != "ce-id"}, content, "missing: ce-id"),
        (headers, b'"just a string"', "must be a JSON object"),
        ({**binary_mode(event("gcp_storage_object_finalized.json"))[0]}, b'{"name": "x.jsonl"}', "bucket"),
        ({"content-type": "application/cloudevents+json"}, b"{", "not a valid CloudEvent"),
    ]
    for request_headers, body, expected in cases:
        answer = httpx.post(f"{service}/", headers=request_headers, content=body)
        assert answer.status_code == 400, (body, answer.text)
        assert answer.headers["content-type"] == "application/json"
        assert expected in answer.json()["error"], (expected, answer.json())
    # The root answers nothing else; the core's routes are untouched.
    assert httpx.get(f"{service}/").status_code == 404


# Cloud Storage ---------------------------------------------------------------------------------

def storage_event(bucket: str, name: str) -> tuple[dict, bytes]:
    """Google's finalized CloudEvent for this object, in binary mode with Eventarc's source and subject."""
    cloud_event = event("gcp_storage_object_finalized.json")
    cloud_event["id"] = uuid.uuid4().hex
    cloud_event["source"] = f"//storage.googleapis.com/projects/_/buckets/{bucket}"
    cloud_event["subject"] = f"objects/{name}"
    cloud_event["data"].update(bucket=bucket, name=name, id=f"{bucket}/{name}/1")
    return binary_mode(cloud_event)


def test_a_finalized_object_is_scored_once(service, gcs):
    client, bucket = gcs
    client.put_object(Bucket=bucket, Key="incoming/rows.jsonl", Body=b"1.0\n2.0\n\n5.0\n")
    headers, content = storage_event(bucket, "incoming/rows.jsonl")
    answer = httpx.post(f"{service}/", headers=headers, content=content)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    manifest = f"results/{bucket}/incoming/rows.jsonl.predictions/manifest.json"
    assert result == {"source": f"gs://{bucket}/incoming/rows.jsonl", "status": "scored",
                      "output": f"gs://{bucket}/{manifest}", "rows": 3, "errors": 0}
    parts = [item["Key"] for item in client.list_objects_v2(
        Bucket=bucket, Prefix="results/" + bucket + "/incoming/rows.jsonl.predictions/part-")["Contents"]]
    lines = [json.loads(line) for part in parts for line in read_object(gcs, part).splitlines()]
    assert lines == [{"row": 0, "predictions": 2.5}, {"row": 1, "predictions": 3.0}, {"row": 2, "predictions": 4.5}]
    # Eventarc delivers at least once: the redelivered event finds the results in place.
    again = httpx.post(f"{service}/", headers=headers, content=content)
    assert again.status_code == 200 and again.json()["status"] == "skipped"
    # The service's own results landing in the bucket are never scored.
    headers, content = storage_event(bucket, manifest)
    assert httpx.post(f"{service}/", headers=headers, content=content).json()["status"] == "skipped"


def test_an_object_that_cannot_be_scored_is_acknowledged(service, gcs):
    _, bucket = gcs
    for name, expected in (("incoming/gone.jsonl", "no such key"), ("incoming/notes.txt", "cannot score this object")):
        headers, content = storage_event(bucket, name)
        answer = httpx.post(f"{service}/", headers=headers, content=content)
        assert answer.status_code == 200 and answer.json()["status"] == "failed", answer.text
        assert expected in answer.json()["error"]


# Start-up --------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, expected", [
    ({}, "KILN_MODEL_REPOSITORY"),  # checked at import, in the master
    ({"KILN_MODEL_REPOSITORY": "/nonexistent/models"}, "no models in"),  # found in the worker
])
def test_a_service_that_cannot_start_exits_saying_why(settings, expected, tmp_path, s3_endpoint):
    log = tmp_path / "service.log"
    process = functions_framework(free_port(), kiln_env(tmp_path, s3_endpoint, **settings), log)
    try:
        assert process.wait(120) != 0
    finally:
        if process.poll() is None:
            process.kill()
    assert expected in log.read_text()


# Cloud Run Jobs --------------------------------------------------------------------------------

def run_job(tmp: Path, endpoint: str, *inputs: str, index: int = 0, count: int = 1, **env: str):
    """`python -m handlers.cloud_run_job INPUT...` as task `index` of `count`; (exit code, summary, log)."""
    environment = kiln_env(tmp, endpoint, CLOUD_RUN_TASK_INDEX=str(index), CLOUD_RUN_TASK_COUNT=str(count), **env)
    done = subprocess.run([sys.executable, "-m", "handlers.cloud_run_job", *inputs], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=600)
    summaries = [json.loads(line)["summary"] for line in done.stderr.splitlines()
                 if line.startswith("{") and "summary" in json.loads(line)]
    return done.returncode, summaries[0] if summaries else None, done.stderr


def test_job_tasks_share_the_inputs_and_score_each_once(examples, tmp_path, s3_endpoint, gcs):
    client, bucket = gcs
    names = [f"jobs/batch-{i}.jsonl" for i in range(7)]
    for i, name in enumerate(names):
        client.put_object(Bucket=bucket, Key=name, Body=f"{i}.0\n{i + 1}.0\n".encode())
    settings = {"KILN_MODEL_REPOSITORY": str(examples["half_plus_two"].servable.parent.parent),
                "KILN_MODEL_NAME": "half_plus_two", "KILN_OUTPUT_PREFIX": str(tmp_path / "out"),
                "KILN_SCORE_INPUTS": f"gs://{bucket}/jobs/"}
    runs = [run_job(tmp_path, s3_endpoint, index=index, count=2, **settings) for index in (0, 1)]
    assert [code for code, _, _ in runs] == [0, 0], [log for _, _, log in runs]
    summaries = [summary for _, summary, _ in runs]
    assert all(summary["objects"] == 7 and summary["failed"] == 0 for summary in summaries)
    # Every object in exactly one share, scored there (none found done by the other task).
    assert sum(summary["assigned"] for summary in summaries) == 7
    assert [summary["scored"] for summary in summaries] == [summary["assigned"] for summary in summaries]
    assert sorted(str(path.relative_to(tmp_path / "out" / bucket)) for path in (tmp_path / "out").rglob("manifest.json")) \
        == [f"{name}.predictions/manifest.json" for name in names]
    # Cloud Run retries a task: the rerun finds its share done.
    code, summary, _ = run_job(tmp_path, s3_endpoint, index=1, count=2, **settings)
    assert code == 0 and summary["skipped"] == runs[1][1]["assigned"] and summary["scored"] == 0


def test_a_job_with_a_failed_object_exits_non_zero(examples, tmp_path, s3_endpoint):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "good.jsonl").write_text("1.0\n")
    (inputs / "bad.jsonl.gz").write_bytes(b"not gzip")
    settings = {"KILN_MODEL_REPOSITORY": str(examples["half_plus_two"].servable.parent.parent),
                "KILN_MODEL_NAME": "half_plus_two", "KILN_OUTPUT_PREFIX": str(tmp_path / "out")}
    code, summary, log = run_job(tmp_path, s3_endpoint, str(inputs), **settings)
    assert code == 1 and summary["scored"] == 1 and summary["failed"] == 1, log
    assert summary["failures"] == [str(inputs / "bad.jsonl.gz")] and "gzip stream is corrupt" in log
    code, summary, log = run_job(tmp_path, s3_endpoint, str(inputs), index=2, count=2, **settings)
    assert code == 2 and summary is None and "CLOUD_RUN_TASK_INDEX" in log
    code, _, log = run_job(tmp_path, s3_endpoint, **settings)
    assert code == 2 and "KILN_SCORE_INPUTS" in log


def test_the_results_store_is_opened_once_and_named_when_missing(tmp_path):
    """handlers.records.OutputStore, Lambda's and Cloud Run's one opener of KILN_OUTPUT_PREFIX: unset, a
    ConfigError naming it and the events that need it (not retried, as for Lambda's queue records);
    set, one store for every event."""
    from handlers.records import OutputStore
    from runtime.errors import ConfigError, retryable

    with pytest.raises(ConfigError, match="KILN_OUTPUT_PREFIX is not set: Pub/Sub messages write their results") as e:
        OutputStore(None).open("Pub/Sub messages")
    assert not retryable(e.value)
    outputs = OutputStore(str(tmp_path / "results"))
    assert outputs.open("Pub/Sub messages") is outputs.open("Cloud Storage events")
    assert outputs.open("Pub/Sub messages").url.endswith("results")
