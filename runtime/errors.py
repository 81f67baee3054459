"""Typed errors, and the one place they become protocol statuses.

Each error carries a message meant for the person who sent the request or built the servable: what
was wrong, what was expected, what was received. status_of() maps an error to TensorFlow Serving's
HTTP status and gRPC code; no handler maps errors itself.
"""


class KilnError(Exception):
    """Base of every error Kiln reports on purpose (anything else is a bug)."""


class InvalidInput(KilnError):
    """A request that does not fit: its body, its inputs' names, dtypes, shapes or values, or a
    signature or version label the model does not have (TF Serving answers those with 400 too)."""


class BodyTooLarge(InvalidInput):
    """A request body over the configured limit."""


class NotFound(KilnError):
    """A model or version that is not served."""


class Unsupported(KilnError):
    """Valid but not supported here, such as a dtype the engine cannot run."""


class ServableError(KilnError):
    """A servable that cannot be loaded: missing or corrupt files, other CPU, unknown format."""


class CompileError(KilnError):
    """A SavedModel that cannot be compiled as asked, naming the signature and the reason."""


class StorageError(KilnError):
    """A model store that cannot be read: unreachable after retries, or refusing access."""


class KeyNotFound(StorageError):
    """The store answered, and it holds nothing at this key."""


class Unauthenticated(KilnError):
    """A request without credentials where the server requires them."""


class PermissionDenied(KilnError):
    """A request whose credentials the server does not accept, or from an origin it does not allow."""


class DeadlineExceeded(KilnError):
    """A request whose deadline passed before its answer was ready; its work is not started."""


class ResourceExhausted(KilnError):
    """A request refused at once because the server's queue for its model is full."""


class ConfigError(KilnError):
    """A model configuration (flags, models.config, YAML or JSON) that cannot be used as written."""


class StoreUnavailable(StorageError):
    """A session store that cannot be reached or does not answer in time; nothing was read or used."""


class SessionConflict(KilnError):
    """A session advanced by another request while this one worked from an older version of it:
    this request's state was not stored (exactly one of two concurrent writers wins)."""


class SessionLost(KilnError):
    """A session whose stored state cannot be used. `version` is the version to save a rebuilt
    state over; `history` its token history (a numpy array) when one is kept, else None."""

    def __init__(self, message: str, *, version: int = 0, history=None):
        super().__init__(message)
        self.version = version
        self.history = history


class SessionNotFound(SessionLost):
    """A session with no state stored: never saved, deleted, or expired."""


class SessionCorrupt(SessionLost):
    """A session whose stored state fails its checks (header, checksum, a missing part); never used."""


class SessionStale(SessionLost):
    """A session whose state was saved by another servable version than the one asked for."""


# (HTTP status, gRPC status code name), most specific class first.
STATUSES: list[tuple[type[KilnError], int, str]] = [
    (BodyTooLarge, 413, "INVALID_ARGUMENT"),
    (InvalidInput, 400, "INVALID_ARGUMENT"),
    (ConfigError, 400, "INVALID_ARGUMENT"),
    (SessionConflict, 409, "ABORTED"),
    (SessionNotFound, 404, "NOT_FOUND"),
    (SessionStale, 412, "FAILED_PRECONDITION"),
    (SessionCorrupt, 500, "DATA_LOSS"),
    (Unauthenticated, 401, "UNAUTHENTICATED"),
    (PermissionDenied, 403, "PERMISSION_DENIED"),
    (NotFound, 404, "NOT_FOUND"),
    (DeadlineExceeded, 504, "DEADLINE_EXCEEDED"),
    (ResourceExhausted, 503, "RESOURCE_EXHAUSTED"),
    (Unsupported, 501, "UNIMPLEMENTED"),
    (StorageError, 503, "UNAVAILABLE"),
    (ServableError, 500, "INTERNAL"),
    (CompileError, 500, "INTERNAL"),
]


def status_of(error: BaseException) -> tuple[int, str]:
    """The HTTP status and gRPC code for an error; anything unexpected is an internal error."""
    for kind, http, grpc in STATUSES:
        if isinstance(error, kind):
            return http, grpc
    return 500, "INTERNAL"


def retryable(error: BaseException) -> bool:
    """Whether work that failed so may pass when tried again: the one rule by which the Lambda and
    Cloud Run handlers have an event redelivered or acknowledge it. A 4xx is the request's own and
    comes back the same, but 409: a session conflict, which a retry may win. 501 (Unsupported) is
    permanent: the same request stays unsupported. A missing object (KeyNotFound) is gone for good.
    Other 5xx, and errors that are not Kiln's (a bug), may pass."""
    http = status_of(error)[0]
    return not isinstance(error, KeyNotFound) and (http == 409 or not (400 <= http < 500 or http == 501))


def shown(value, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters, for quoting a request's value in an error message:
    it never floods the message, and never fails (Python refuses to write an int of 4300+ digits)."""
    try:
        text = repr(value)
    except ValueError:
        return f"a {type(value).__name__} too large to show"
    return text if len(text) <= limit else text[: limit - 3] + "..."
