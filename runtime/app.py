"""The protocol-neutral core: a request is (method, path, headers, body); the core routes it,
decodes it with a codec, runs it on the version the repository hands out, and encodes the answer.
Every handler (local server, Lambda, Cloud Run) adapts its events to `App.handle`; none routes,
decodes or maps errors itself.

Routes so far. TensorFlow Serving's REST API v1:
  GET  /v1/models/NAME[/versions/N | /labels/L]            model status
  GET  /v1/models/NAME[/versions/N | /labels/L]/metadata   signature metadata
  POST /v1/models/NAME[/versions/N | /labels/L]:predict    predict (row or columnar JSON)
  POST /v1/models/NAME[/versions/N | /labels/L]:classify   classify tf.Examples given as JSON
  POST /v1/models/NAME[/versions/N | /labels/L]:regress    regress tf.Examples given as JSON
The Open Inference Protocol (KServe v2) over REST:
  GET  /v2, /v2/health/live, /v2/health/ready              server metadata, liveness, readiness
  GET  /v2/models/NAME[/versions/N][/ready]                model metadata, model readiness
  POST /v2/models/NAME[/versions/N]/infer                  inference on JSON tensors
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote

import orjson

from runtime import __version__
from runtime.codecs import examples, oip
from runtime.codecs.tfserving import decode_predict, encode_predict, read_predict
from runtime.errors import BodyTooLarge, InvalidInput, KilnError, NotFound, status_of
from runtime.manifest import Signature, TensorSpec
from runtime.repository import Repository
from runtime.version_policy import State

log = logging.getLogger(__name__)
JSON = {"Content-Type": "application/json"}
DEFAULT_MAX_BODY_BYTES = 64 << 20
# TF Serving's ModelVersionStatus states: a failed load is END with an error status.
REPORTED_STATE = {State.START: "START", State.LOADING: "LOADING", State.AVAILABLE: "AVAILABLE",
                  State.UNLOADING: "UNLOADING", State.END: "END", State.ERROR: "END"}
DTYPE_ENUM = {"float16": "DT_HALF", "bfloat16": "DT_BFLOAT16", "float32": "DT_FLOAT", "float64": "DT_DOUBLE",
              "int8": "DT_INT8", "int16": "DT_INT16", "int32": "DT_INT32", "int64": "DT_INT64",
              "uint8": "DT_UINT8", "uint16": "DT_UINT16", "uint32": "DT_UINT32", "uint64": "DT_UINT64",
              "bool": "DT_BOOL", "string": "DT_STRING", "complex64": "DT_COMPLEX64",
              "complex128": "DT_COMPLEX128"}
MODEL_PATH = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
    r"(?:(?P<metadata>/metadata)|:(?P<verb>[A-Za-z]+))?$")


OIP_MODEL_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>\d+))?(?P<action>/ready|/infer)?$")
DEFAULT_SIGNATURE = "serving_default"


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=lambda: dict(JSON))


@dataclass(frozen=True)
class Target:
    """Which model version a request addresses."""

    name: str
    version: int | None = None
    label: str | None = None


class App:
    def __init__(self, repository: Repository, *, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self.repository = repository
        self.max_body_bytes = max_body_bytes

    def handle(self, request: Request) -> Response:
        """Answer one request; every failure becomes TF Serving's {"error": ...} with its status."""
        try:
            return self._route(request)
        except KilnError as e:
            return error_response(e)
        except Exception as e:  # a bug: the client gets a plain 500, the log gets the traceback
            log.exception("internal error serving %s %s", request.method, request.path)
            return error_response(e, "internal error")

    def _route(self, request: Request) -> Response:
        if request.path == "/v2" or request.path.startswith("/v2/"):
            return self._route_oip(request)
        match = MODEL_PATH.match(request.path)
        if match is None:  # as TF Serving: malformed under /v1/, unknown elsewhere
            if request.path.startswith("/v1/"):
                raise InvalidInput(f"Malformed request: {request.method} {request.path}")
            raise NotFound(f"no such endpoint: {request.method} {request.path}")
        target = _target(match)
        verb, metadata = match["verb"], match["metadata"]
        if verb is None:
            if request.method != "GET":
                raise InvalidInput(f"{request.method} is not supported on {request.path}; use GET")
            return self._metadata(target) if metadata else self._status(target)
        if request.method != "POST":
            raise InvalidInput(f":{verb} takes POST, not {request.method}")
        self._check_size(request)
        if verb == "predict":
            return self._predict(target, request.body)
        if verb in examples.METHODS:
            return self._classify_or_regress(target, request.body, examples.METHODS[verb])
        raise InvalidInput(f"unknown method ':{verb}'; this server answers :predict, :classify and :regress")

    def _route_oip(self, request: Request) -> Response:
        if request.path == "/v2":
            return _json({"name": "kiln", "version": __version__, "extensions": []})
        if request.path == "/v2/health/live":
            return _json({"live": True})
        if request.path == "/v2/health/ready":
            ready = all(self.repository.is_available(name) for name in self.repository.names())
            return _json({"ready": ready}, 200 if ready else 503)
        match = OIP_MODEL_PATH.match(request.path)
        if match is None:
            raise NotFound(f"no such endpoint: {request.method} {request.path}")
        target = Target(unquote(match["name"]), int(match["version"]) if match["version"] else None)
        action = match["action"]
        if action == "/infer":
            if request.method != "POST":
                raise InvalidInput(f"/infer takes POST, not {request.method}")
            self._check_size(request)
            return self._infer(target, request.body)
        if request.method != "GET":
            raise InvalidInput(f"{request.method} is not supported on {request.path}; use GET")
        with self._handle(target) as handle:
            if action == "/ready":
                return _json({"name": handle.name, "ready": True})
            versions = [v.version for v in self.repository.status(handle.name).versions if v.state is State.AVAILABLE]
            return _json(oip.metadata(handle.name, versions, _default_signature(handle.engine)[1]))

    def _infer(self, target: Target, body: bytes) -> Response:
        with self._handle(target) as handle:
            key, signature = _default_signature(handle.engine)
            inputs, names, request_id = oip.decode_infer(body, signature)
            outputs = handle.engine.run(key, inputs)
            return Response(200, orjson.dumps(oip.encode_infer(handle.name, handle.version, outputs, names, request_id),
                                              option=orjson.OPT_SERIALIZE_NUMPY))

    def _check_size(self, request: Request) -> None:
        if len(request.body) > self.max_body_bytes:
            raise BodyTooLarge(f"the request body has {len(request.body)} bytes; the limit is "
                               f"{self.max_body_bytes}")

    def _status(self, target: Target) -> Response:
        version = target.version
        if target.label is not None:
            with self.repository.handle(target.name, label=target.label) as handle:
                version = handle.version
        status = self.repository.status(target.name, version)
        return _json({"model_version_status": [
            {"version": str(v.version), "state": REPORTED_STATE[v.state],
             "status": {"error_code": "UNKNOWN" if v.error else "OK", "error_message": v.error}}
            for v in status.versions]})

    def _metadata(self, target: Target) -> Response:
        with self._handle(target) as handle:
            signatures = {key: _signature_def(sig) for key, sig in handle.engine.signatures.items()}
            return _json({"model_spec": {"name": handle.name, "signature_name": "", "version": str(handle.version)},
                          "metadata": {"signature_def": {"signature_def": signatures}}})

    def _predict(self, target: Target, body: bytes) -> Response:
        signature_name, parsed = read_predict(body)
        with self._handle(target) as handle:
            decoded = decode_predict(signature_name, parsed, handle.engine.signature(signature_name))
            outputs = handle.engine.run(signature_name, decoded.inputs)
        return Response(200, encode_predict(outputs, decoded.row_format))

    def _classify_or_regress(self, target: Target, body: bytes, method: str) -> Response:
        signature_name, rows = examples.read_examples(body)
        serialized = examples.serialize(rows)
        with self._handle(target) as handle:
            signature = handle.engine.signature(signature_name)
            input_name = examples.check_method(signature_name, signature, method)
            outputs = handle.engine.run(signature_name, {input_name: serialized})
        return _json(examples.encode_results(outputs, method))

    def _handle(self, target: Target):
        return self.repository.handle(target.name, version=target.version, label=target.label)


def _target(match: re.Match) -> Target:
    version, label = match["version"], match["label"]
    return Target(unquote(match["name"]), int(version) if version is not None else None,
                  unquote(label) if label is not None else None)


def _default_signature(engine) -> tuple[str, Signature]:
    """The signature the Open Inference Protocol, which has none, reaches: serving_default, or the
    only one."""
    if DEFAULT_SIGNATURE in engine.signatures:
        return DEFAULT_SIGNATURE, engine.signatures[DEFAULT_SIGNATURE]
    if len(engine.signatures) == 1:
        return next(iter(engine.signatures.items()))
    raise InvalidInput(f"the model has no {DEFAULT_SIGNATURE} signature, and several others "
                       f"({', '.join(engine.signatures)}); the Open Inference Protocol cannot choose")


def _signature_def(signature: Signature) -> dict:
    return {"inputs": {s.name: _tensor_info(s) for s in signature.inputs},
            "outputs": {s.name: _tensor_info(s) for s in signature.outputs},
            "method_name": signature.method}


def _tensor_info(spec: TensorSpec) -> dict:
    return {"dtype": DTYPE_ENUM.get(spec.dtype, "DT_INVALID"), "name": spec.name,
            "tensor_shape": {"dim": [{"size": str(-1 if d is None else d), "name": ""} for d in spec.shape],
                             "unknown_rank": False}}


def _json(body: dict, status: int = 200) -> Response:
    return Response(status, orjson.dumps(body))


def error_response(error: BaseException, message: str | None = None) -> Response:
    http, _ = status_of(error)
    return _json({"error": message if message is not None else str(error)}, http)
