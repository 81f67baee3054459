"""The compile function: an S3 ObjectCreated event for PREFIX/NAME/VERSION/saved_model.pb compiles
that SavedModel version into KILN_SERVABLE_BASE/NAME/VERSION and publishes it (manifest last), which
`kiln serve`, Lambda and Cloud Run instances polling that base then swap in. It is `kiln compile
--watch s3://BUCKET/PREFIX KILN_SERVABLE_BASE --once --only NAME/VERSION` (runtime/compile_watch.py)
run for the event's object, so the watcher and the function publish alike.

Settings: KILN_SERVABLE_BASE (required: s3://, gs:// or a path), KILN_COMPILE_FLAGS (kiln compile's
options, such as `--batch-sizes 1,8 --target-cpu x86-64-v3`: the fleet's CPUs, not the compiler's).
Upload saved_model.pb after the variables (the notification's filter: suffix saved_model.pb). A
version already compiled is skipped, so a redelivered event does nothing; a failure raises, so an
asynchronous invocation is retried and then goes to the function's on-failure destination. The
image is infra/Dockerfile's `compile` target (TensorFlow and g++); the first compile in a fresh
environment also builds the XLA AOT runtime objects (minutes: give the function 10 GB and 15 minutes,
or run the image as a job).
"""

from __future__ import annotations

import os
import re
import shlex
from urllib.parse import unquote_plus

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.data_classes import S3Event

from runtime.cli import main as kiln

logger = Logger(service="kiln-compile")
SAVED_MODEL_KEY = re.compile(r"^(?:(?P<prefix>.+)/)?(?P<name>[^/]+)/(?P<version>\d+)/saved_model\.pb$")


def handler(event: dict, context) -> dict:
    target = os.environ.get("KILN_SERVABLE_BASE")
    if not target:
        raise ValueError("KILN_SERVABLE_BASE is not set: where compiled servables are published (s3://BUCKET/PREFIX)")
    flags = shlex.split(os.environ.get("KILN_COMPILE_FLAGS", ""))
    compiled, ignored = [], []
    for record in S3Event(event).records:
        key = unquote_plus(record.s3.get_object.key)  # S3 notifications encode keys as in a form
        match = SAVED_MODEL_KEY.match(key)
        if not record.event_name.startswith("ObjectCreated:") or match is None:
            ignored.append(key)
            continue
        source = f"s3://{record.s3.bucket.name}" + (f"/{match['prefix']}" if match["prefix"] else "")
        only = f"{match['name']}/{match['version']}"
        logger.info("compiling", extra={"source": f"{source}/{only}", "target": target})
        if kiln(["compile", "--watch", source, target, "--once", "--only", only, *flags]) != 0:
            raise RuntimeError(f"compiling {source}/{only} into {target} failed (the log says why)")
        compiled.append(f"{target}/{only}")
    return {"compiled": compiled, "ignored": ignored}
