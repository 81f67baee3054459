"""What the Lambda and Cloud Run handlers do alike with a message (an SQS or Kinesis record, a Step
Functions item, a direct invocation, a Pub/Sub message): run its TF Serving predict body, and answer
it as strict JSON. Lambda and Step Functions take no bare NaN or Infinity, and results written as
JSON objects are read by strict parsers too, so there NaN and ±Infinity are the strings "NaN",
"Infinity" and "-Infinity" (runtime.codecs.tfserving.NON_FINITE_STRINGS), as in every result that
`kiln score` writes; only HTTP bodies carry TF Serving's bare tokens. Both write results to the same
kind of store (OutputStore), under one rule for failures (write_outcome)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from runtime.app import App
from runtime.codecs.tfserving import decode_predict, predict_values, read_predict
from runtime.errors import ConfigError, InvalidInput, KilnError, retryable, shown, status_of
from runtime.exchange import Exchange
from runtime.storage import Storage, open_storage


async def predict_message(
    app: App, body: bytes | str | dict, model: str | None, exchange: Exchange
) -> tuple[dict, dict]:
    """({"model", "version"} that answered, the predict response as strict-JSON values) for a
    predict body, on the model its "model" key names, else `model` (KILN_SCORE_MODEL), else the only one."""
    signature_name, request = read_predict(body)
    name = request.get("model")
    if name is not None and not isinstance(name, str):
        raise InvalidInput(f"'model' must be a model's name, got {shown(name)}")
    with app.repository.hold(app.repository.named_or_only(name or model)) as handle:
        decoded = decode_predict(signature_name, request, handle.engine.signature(signature_name))
        outputs = await app.execute(handle, signature_name, decoded.inputs, exchange)
        served = {"model": handle.name, "version": str(handle.version)}
    return served, predict_values(outputs, decoded.row_format, strict=True)


class OutputStore:
    """The store events' results go to (KILN_OUTPUT_PREFIX), opened on first use. Unset, it is the
    deployment's error (ConfigError, not retried: redelivering cannot set it)."""

    def __init__(self, prefix: str | None):
        self.prefix = prefix or ""
        self._storage: Storage | None = None

    def url(self, what: str) -> str:
        """The prefix, once open() found it set."""
        self.open(what)
        return self.prefix

    def open(self, what: str) -> Storage:
        """The store; `what`: the events that need it, named in the error when it is not configured."""
        if not self.prefix:
            raise ConfigError(
                f"KILN_OUTPUT_PREFIX is not set: {what} write their results under it "
                f"(s3://bucket/prefix, gs://bucket/prefix or a path)"
            )
        if self._storage is None:
            self._storage = open_storage(self.prefix)
        return self._storage


@dataclass(frozen=True)
class Written:
    """Where a message's outcome was written: its result, or its error when it can never succeed."""

    url: str
    error: KilnError | None = None


async def write_outcome(outputs: Storage, key: str, result: Awaitable[dict], about: Mapping[str, Any]) -> Written:
    """A message's result written at KEY.json; or, when it failed in a way that cannot pass
    (runtime.errors.retryable), its error and `about` at KEY.error.json, for the caller to log and
    acknowledge: redelivered, it would only fail again until its retention or the dead-letter queue
    (or, on a Kinesis shard, hold up every record behind it). Any other failure is raised, for the
    queue to redeliver."""
    try:
        value = await result
    except KilnError as e:
        if retryable(e):
            raise
        error_key = f"{key}.error.json"
        record = {**about, "status": status_of(e)[0], "error": str(e)}
        await asyncio.to_thread(outputs.write_bytes, error_key, orjson.dumps(record))
        return Written(f"{outputs.url}/{error_key}", e)
    await asyncio.to_thread(outputs.write_bytes, f"{key}.json", orjson.dumps(value))
    return Written(f"{outputs.url}/{key}.json")
