"""The events Google Cloud posts to a Cloud Run service, read into typed values.

Two deliveries reach the service root (`POST /`):

- Pub/Sub push (a push subscription's default, "wrapped" format): a JSON body
  {"message": {"data": BASE64, "attributes": {...}, "messageId": ..., "publishTime": ...},
   "subscription": "projects/P/subscriptions/S", "deliveryAttempt": N}; Pub/Sub repeats
  messageId and publishTime as message_id and publish_time.
- CloudEvents from Eventarc, in binary content mode (ce-* headers, the data as the body: what
  Eventarc sends) or structured mode (application/cloudevents+json), parsed by the `cloudevents`
  library: google.cloud.pubsub.topic.v1.messagePublished, whose data is the push body above, and
  google.cloud.storage.object.v1.finalized, whose data is the object's metadata (bucket, name,
  generation, ...).

Anything else is an InvalidInput naming what was expected: such a request does not come from
Pub/Sub or Eventarc, so its sender is told (400) rather than acknowledged. What a well-formed
message carries is the handler's business (handlers.cloud_run).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Self, TypeVar

import msgspec
import orjson

from runtime.errors import InvalidInput
from runtime.record import NonEmpty, Record, problem

PUBSUB_PUBLISHED = "google.cloud.pubsub.topic.v1.messagePublished"
STORAGE_FINALIZED = "google.cloud.storage.object.v1.finalized"
EXPECTED = (
    f'a Pub/Sub push message ({{"message": {{"data": ..., "messageId": ...}}, "subscription": ...}}) '
    f"or a CloudEvent (ce-* headers, or application/cloudevents+json) of type {PUBSUB_PUBLISHED} "
    f"or {STORAGE_FINALIZED}"
)
BINARY_HEADERS = ("ce-id", "ce-source", "ce-specversion", "ce-type")
# A message id names its result object, so it must be a plain file name (Pub/Sub's are digits).
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
# Pub/Sub's keys in snake case, for the camelCase names the records read.
CAMEL_CASE = {"message_id": "messageId", "publish_time": "publishTime", "delivery_attempt": "deliveryAttempt"}


class _Wire(Record, frozen=True, forbid_unknown_fields=False):
    """Google's payloads carry more than this service reads, and gain fields over time."""


class PubsubMessage(_Wire, frozen=True):
    id: Annotated[str, msgspec.Meta(pattern=ID_PATTERN)] = msgspec.field(name="messageId")
    data: str = ""  # base64
    attributes: dict[str, str] = msgspec.field(default_factory=dict)
    publish_time: str | None = msgspec.field(default=None, name="publishTime")

    def payload(self) -> bytes:
        try:
            return base64.b64decode(self.data, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(f"the Pub/Sub message's data is not base64: {self.data[:60]!r}") from None


class PubsubDelivery(_Wire, frozen=True):
    """A Pub/Sub message as pushed, or as the data of a messagePublished CloudEvent."""

    message: PubsubMessage
    subscription: str = ""
    delivery_attempt: int | None = msgspec.field(default=None, name="deliveryAttempt")

    @classmethod
    def parse(cls, data: Any) -> Self:
        """Either spelling of the keys Pub/Sub repeats (messageId or message_id, ...); camelCase wins."""
        if isinstance(data, dict):
            data = _camel_case(data)
            if isinstance(data.get("message"), dict):
                data["message"] = _camel_case(data["message"])
        return super().parse(data)


class ObjectFinalized(_Wire, frozen=True):
    """A Cloud Storage object that was created or overwritten (the event's StorageObjectData)."""

    bucket: NonEmpty
    name: NonEmpty
    generation: int | str | None = None

    @property
    def url(self) -> str:
        return f"gs://{self.bucket}/{self.name}"


@dataclass(frozen=True)
class Event:
    kind: str  # "pubsub" or "storage"
    id: str  # the message id, or the CloudEvent's id
    body: PubsubDelivery | ObjectFinalized


def read_event(headers: Mapping[str, str], body: bytes) -> Event:
    """The delivery a request carries (header names lower-case); InvalidInput if it is none."""
    content_type = headers.get("content-type", "")
    envelope = None
    if "ce-specversion" not in headers and not content_type.startswith("application/cloudevents"):
        try:
            envelope = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise InvalidInput(f"the body is not JSON ({e}); expected {EXPECTED}") from None
        if not isinstance(envelope, dict) or not ({"message", "specversion"} & envelope.keys()):
            keys = sorted(envelope) if isinstance(envelope, dict) else type(envelope).__name__
            raise InvalidInput(f"expected {EXPECTED}; got a JSON body with {keys}")
    if envelope is not None and "specversion" not in envelope:
        delivery = _validated(PubsubDelivery, envelope, "the Pub/Sub push message")
        return Event("pubsub", delivery.message.id, delivery)
    return _cloud_event(headers, body)


def _cloud_event(headers: Mapping[str, str], body: bytes) -> Event:
    from cloudevents.exceptions import GenericException
    from cloudevents.http import from_http

    missing = [name for name in BINARY_HEADERS if name not in headers]
    if "ce-specversion" in headers and missing:  # else the library reads the body as a structured event
        raise InvalidInput(
            f"not a valid CloudEvent: binary content mode needs the headers "
            f"{', '.join(BINARY_HEADERS)}; missing: {', '.join(missing)}"
        )
    try:
        event = from_http(dict(headers), body)
    except (GenericException, ValueError, TypeError) as e:
        raise InvalidInput(f"not a valid CloudEvent: {e}") from None
    kind = event["type"]
    if kind == PUBSUB_PUBLISHED:
        delivery = _validated(PubsubDelivery, event.data, f"the {kind} CloudEvent's data")
        return Event("pubsub", delivery.message.id, delivery)
    if kind == STORAGE_FINALIZED:
        return Event("storage", event["id"], _validated(ObjectFinalized, event.data, f"the {kind} CloudEvent's data"))
    raise InvalidInput(
        f"this service takes CloudEvents of type {PUBSUB_PUBLISHED} or {STORAGE_FINALIZED}, not {kind!r}"
    )


_W = TypeVar("_W", bound=_Wire)


def _validated(model: type[_W], data: Any, what: str) -> _W:
    if not isinstance(data, dict):
        raise InvalidInput(f"{what} must be a JSON object, got {type(data).__name__}: {str(data)[:60]!r}")
    try:
        return model.parse(data)
    except ValueError as e:
        raise InvalidInput(f"{what} does not fit: {problem(e)}") from None


def _camel_case(data: dict[str, Any]) -> dict[str, Any]:
    return {**{CAMEL_CASE.get(key, key): value for key, value in data.items()}, **data}
