"""The compile function: an upload of PREFIX/NAME/VERSION/saved_model.pb compiles that SavedModel
version into KILN_SERVABLE_BASE/NAME/VERSION and publishes it (manifest last), which `kiln serve`,
Lambda and Cloud Run instances polling that base then swap in. It is `kiln compile --watch
STORE/PREFIX KILN_SERVABLE_BASE --once --only NAME/VERSION` (runtime/compile_watch.py) run for the
uploaded object, so the watcher and the function publish alike.

Two entry points, one per cloud: `handler`, on Lambda, for S3's ObjectCreated notifications or
EventBridge's "Object Created" (the SAM template wires EventBridge: it works for an existing bucket);
`cloud_event`, on Cloud Run under functions-framework (`--signature-type cloudevent`), for
Eventarc's google.cloud.storage.object.v1.finalized.

Settings: KILN_SERVABLE_BASE (required: s3://, gs:// or a path), KILN_COMPILE_FLAGS (kiln compile's
options, such as `--batch-sizes 1,8 --target-cpu x86-64-v3`: the fleet's CPUs, not the compiler's).
Upload saved_model.pb after the variables (the trigger's filter: suffix saved_model.pb). A version
already compiled is skipped, so a redelivered event does nothing; a failure raises, so the event is
retried (Lambda's asynchronous retries, Eventarc's redelivery on a 5xx). The image is
infra/Dockerfile's `compile` target (TensorFlow and g++); the first compile in a fresh environment
also builds the XLA AOT runtime objects (minutes: give the function 10 GB and 15 minutes).
"""

from __future__ import annotations

import os
import re
import shlex
from urllib.parse import unquote_plus

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.data_classes import S3Event, S3EventBridgeNotificationEvent

from handlers.gcp_events import STORAGE_FINALIZED
from runtime.cli import main as kiln

logger = Logger(service="kiln-compile")
SAVED_MODEL_KEY = re.compile(r"^(?:(?P<prefix>.+)/)?(?P<name>[^/]+)/(?P<version>\d+)/saved_model\.pb$")


def handler(event: dict, context) -> dict:
    """Lambda: S3's notification records, or one EventBridge Object Created event."""
    if event.get("detail-type") == "Object Created":
        detail = S3EventBridgeNotificationEvent(event).detail  # Powertools decodes its key
        objects = [("ObjectCreated:", detail.bucket.name, detail.object.key)]
    else:  # notifications URL-encode keys as a form does ("a b" is "a+b")
        objects = [
            (record.event_name, record.s3.bucket.name, unquote_plus(record.s3.get_object.key))
            for record in S3Event(event).records
        ]
    return compile_uploads(
        "s3",
        [(bucket, key) for kind, bucket, key in objects if kind.startswith("ObjectCreated:")],
        ignored=[key for kind, _, key in objects if not kind.startswith("ObjectCreated:")],
    )


def cloud_event(event) -> None:
    """Cloud Run (functions-framework, a CloudEvent): Eventarc's Cloud Storage object finalized."""
    if event["type"] != STORAGE_FINALIZED:
        raise ValueError(f"the compile service takes {STORAGE_FINALIZED} events, not {event['type']!r}")
    compile_uploads("gs", [(event.data["bucket"], event.data["name"])])


def compile_uploads(scheme: str, objects: list[tuple[str, str]], ignored: list[str] | None = None) -> dict:
    """Compile and publish the SavedModel version of each uploaded saved_model.pb (bucket, key);
    other keys are ignored. Raises if a compile fails, so that the event is delivered again."""
    target = os.environ.get("KILN_SERVABLE_BASE")
    if not target:
        raise ValueError("KILN_SERVABLE_BASE is not set: where compiled servables are published (s3://BUCKET/PREFIX)")
    flags = shlex.split(os.environ.get("KILN_COMPILE_FLAGS", ""))
    compiled, ignored = [], list(ignored or ())
    for bucket, key in objects:
        match = SAVED_MODEL_KEY.match(key)
        if match is None:
            ignored.append(key)
            continue
        source = f"{scheme}://{bucket}" + (f"/{match['prefix']}" if match["prefix"] else "")
        only = f"{match['name']}/{match['version']}"
        logger.info("compiling", extra={"source": f"{source}/{only}", "target": target})
        if kiln(["compile", "--watch", source, target, "--once", "--only", only, *flags]) != 0:
            raise RuntimeError(f"compiling {source}/{only} into {target} failed (the log says why)")
        compiled.append(f"{target}/{only}")
    return {"compiled": compiled, "ignored": ignored}
