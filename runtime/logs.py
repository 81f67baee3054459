"""Structured logs: one JSON object per line, each carrying the id of the request it is about.

A request's id is the caller's X-Request-Id (gRPC: x-request-id metadata) or a fresh one; it is held
in a context variable for the request's task, and handed to the threads that run its model work
(runtime.app copies the context), so every line logged while serving it names it. Cloud Run and
CloudWatch read these lines as structured entries ("severity" is Cloud Logging's level field).
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time
from contextvars import ContextVar

import orjson

request_id: ContextVar[str | None] = ContextVar("kiln_request_id", default=None)
MAX_REQUEST_ID = 128
_PREFIX = os.urandom(8).hex()
_COUNTER = itertools.count(1)


def new_request_id(presented: str | None = None) -> str:
    """The caller's id when it is a sensible one (printable, not too long), else a fresh one: this
    process's random prefix and a counter (unique, and cheap: os.urandom would let go of the
    interpreter lock on every request, and wait to get it back)."""
    if presented and len(presented) <= MAX_REQUEST_ID and presented.isprintable():
        return presented
    return f"{_PREFIX}{next(_COUNTER):016x}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "severity": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id.get()
        if rid is not None:
            entry["request_id"] = rid
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure(level: str = "INFO") -> None:
    """Log JSON lines to stderr at `level` (a process-wide choice, made once by the entry point)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
