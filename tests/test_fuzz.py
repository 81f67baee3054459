"""Fuzzing a real `kiln serve` (REST and gRPC) over the example servables: whatever a client sends,
the server answers within a timeout, never with a 5xx (or gRPC INTERNAL / UNKNOWN), an error
always as TF Serving's {"error": "..."}, and it still serves correctly afterwards.

Two fuzzers: load/fuzz.py's seeded mutator, 20,000 requests of every kind (TF Serving predict,
classify, regress, :generate on tiny_lm, OIP infer in JSON and binary, and their gRPC forms) damaged
at the JSON and byte level, over one persistent connection (fast: most of the count); and the
hypothesis strategies below, which shrink what they find.

Bodies: random JSON, predict / classify / regress / infer bodies with wrong names, types, shapes and
dtypes, byte-level damage (truncation, invalid UTF-8, bare NaN, huge numbers, b64 garbage), deep
nesting and strings up to the body limit. Paths: random segments, percent-encodings (%00, invalid
escapes), dot segments, very long and non-ASCII paths, every registered method (and a few tokens that
are not). gRPC: random bytes as requests, and random well-formed requests of every dtype and shape.

Not fuzzed on purpose: shapes whose element count is large but allocatable (say 2^31). A TensorProto
with such a shape and no values asks for that many zeros (TensorFlow's fill rule), which Kiln
allocates and runs. Shapes here are tiny, or so large no machine can hold them.
"""

from __future__ import annotations

import http.client
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from load.fuzz import MODELS as SERVED, fuzz
from runtime.app import DEFAULT_MAX_BODY_BYTES
from runtime.codecs.oip import DATATYPES
from runtime.codecs.tensor_proto import DTYPES, VALUE_FIELD, from_ndarray
from runtime.protos import generated_module
from tests.conftest import free_port, kiln_serve

grpc = pytest.importorskip("grpc")

TIMEOUT = 10.0
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.data_too_large])
_predict = generated_module("tensorflow_serving.apis.predict_pb2")
_metadata = generated_module("tensorflow_serving.apis.get_model_metadata_pb2")
_status = generated_module("tensorflow_serving.apis.get_model_status_pb2")
TensorProto = generated_module("tensorflow.core.framework.tensor_pb2").TensorProto


@dataclass
class Server:
    process: object
    host: str
    port: int
    channel: object
    grpc_port: int

    def log(self) -> str:
        """The end of the server's log, for a failure message."""
        path = getattr(self.process, "log_path", None)
        return path.read_text()[-6000:] if path is not None and path.exists() else ""


@pytest.fixture(scope="module")
def server(examples, tmp_path_factory):
    """half_plus_two, digits and tiny_lm (for :generate and stateful signatures), REST and gRPC."""
    grpc_port, root = free_port(), tmp_path_factory.mktemp("repository")
    shutil.copytree(examples["tiny_lm"].servable, root / "tiny_lm" / "1")
    with kiln_serve(examples, root, "--grpc-port", str(grpc_port)) as (process, url):
        host, port = url.removeprefix("http://").split(":")
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        server = Server(process, host, int(port), channel, grpc_port)
        deadline = time.monotonic() + 120
        while b'"AVAILABLE"' not in send(server, "GET", "/v1/models/tiny_lm")[2]:  # kiln_serve waits for the others
            assert time.monotonic() < deadline and process.poll() is None, server.log()
            time.sleep(0.2)
        yield server
        channel.close()


# REST ------------------------------------------------------------------------------------------

def show(body: bytes) -> str:
    return repr(body[:300]) + (f"... ({len(body)} bytes)" if len(body) > 300 else "")


def send(server: Server, method: str, path: str, body: bytes = b"", headers: dict | None = None
         ) -> tuple[int, str, bytes]:
    """One request on its own connection, exactly as given (no client-side path normalization)."""
    started = time.monotonic()
    connection = http.client.HTTPConnection(server.host, server.port, timeout=TIMEOUT)
    try:
        try:
            connection.request(method, path, body=body, headers=headers or {})
        except (BrokenPipeError, ConnectionResetError):
            pass  # a body over the limit: the server may answer before reading all of it
        response = connection.getresponse()
        data = response.read()
    except (OSError, http.client.HTTPException) as e:
        alive = server.process.poll() is None
        pytest.fail(f"{method} {path[:200]!r} {show(body)}: no answer ({e!r}); server alive: {alive}\n"
                    f"{server.log()}")
    finally:
        connection.close()
    elapsed = time.monotonic() - started
    assert elapsed < TIMEOUT, f"{method} {path[:200]!r} {show(body)} took {elapsed:.1f} s"
    return response.status, response.getheader("content-type", ""), data


def check(server: Server, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """Send, and check the answer: no 5xx; an error is JSON with an "error" string. Returns
    (status, parsed JSON body or None)."""
    status, content_type, data = send(server, method, path, body, headers)
    where = f"{method} {path[:200]!r} {show(body)} -> {status} {data[:500]!r}"
    assert status < 500, f"{where}\n{server.log()}"
    if method == "HEAD" or status == 204:
        return status, None
    if status < 400 and not content_type.startswith("application/json"):
        return status, None  # the Prometheus metrics
    assert content_type.startswith("application/json"), where
    try:
        answer = json.loads(data)  # TF Serving's JSON: bare NaN and Infinity allowed
    except ValueError:
        pytest.fail(f"not JSON: {where}")
    if status >= 400:
        assert isinstance(answer, dict) and isinstance(answer.get("error"), str) and answer["error"], where
    return status, answer


def dumps(body) -> bytes:
    return json.dumps(body, allow_nan=True).encode()


MODELS = ("half_plus_two", "digits")
SIGNATURES = ("serving_default", "classify_x_to_y", "regress_x_to_y", "regress_x2_to_y3", "", "nope")
INPUTS = ("x", "images", "inputs", "b64", "x2")
POST_PATHS = ("/v1/models/half_plus_two:predict", "/v1/models/digits:predict",
              "/v1/models/half_plus_two/versions/1:predict", "/v1/models/half_plus_two:classify",
              "/v1/models/half_plus_two:regress", "/v1/models/digits:regress", "/v2/models/half_plus_two/infer",
              "/v2/models/digits/infer", "/v2/models/digits/versions/1/infer")
# Shapes the example signatures take (half_plus_two: x [-1]; digits: images [-1, 28, 28, 1]) and
# near misses.
SHAPES = ((), (1,), (3,), (2, 1), (0,), (2, 0), (1, 28, 28, 1), (2, 28, 28, 1), (1, 28, 28), (1, 28, 28, 2))

numbers = st.one_of(st.floats(), st.integers(), st.sampled_from(
    [0, 1.5, -0.0, 1e308, -1e308, 5e-324, 2**63, -2**63 - 1, 2**64, 10**30, float("nan"), float("inf")]))
b64_objects = st.builds(lambda s: {"b64": s}, st.sampled_from(["", "YQ==", "YQ", "!!!!", "AAAA" * 3, "=="])
                        | st.text(max_size=12))
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=10), st.just("\ud800"), b64_objects)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=20)


def filled(value, shape: tuple[int, ...]):
    """A nested list of the shape holding one value everywhere: cheap tensors of the real sizes."""
    for size in reversed(shape):
        value = [value] * size
    return value


tensors = st.one_of(st.builds(filled, scalars, st.sampled_from(SHAPES)), json_values)
names = st.one_of(st.sampled_from(SIGNATURES), st.text(max_size=8), json_values)
input_names = st.one_of(st.sampled_from(INPUTS), st.text(max_size=6))


def bodies(required: dict, optional: dict) -> st.SearchStrategy[dict]:
    """Mostly each required key on its own, as a client means to send it; sometimes any mix."""
    return st.one_of(*(st.fixed_dictionaries({key: value}, optional=optional) for key, value in required.items()),
                     st.fixed_dictionaries({}, optional={**required, **optional}))


predict_bodies = bodies({
    "instances": st.one_of(tensors, st.lists(st.dictionaries(input_names, tensors, max_size=3), max_size=3)),
    "inputs": st.one_of(tensors, st.dictionaries(input_names, tensors, max_size=3)),
}, {"signature_name": names})
features = st.dictionaries(input_names, st.one_of(scalars, st.lists(scalars, max_size=3), json_values), max_size=3)
example_bodies = bodies({"examples": st.one_of(st.lists(features, max_size=3), json_values)},
                        {"signature_name": names, "context": st.one_of(features, json_values)})
dims = st.one_of(st.integers(-2, 4), st.sampled_from([28, 2**32, 2**62, 2**63 - 1, 2**64, 10**30]))


@st.composite
def oip_tensors(draw):
    """An infer input: consistent (shape matches data, so it reaches the model) or anything."""
    if draw(st.booleans()):
        shape = draw(st.sampled_from(SHAPES))
        return {"name": draw(input_names), "shape": list(shape), "datatype": draw(st.sampled_from(list(DATATYPES))),
                "data": [draw(scalars)] * int(np.prod(shape))}
    return draw(st.fixed_dictionaries({}, optional={
        "name": st.one_of(input_names, json_values), "shape": st.one_of(st.lists(dims, max_size=4), json_values),
        "datatype": st.one_of(st.sampled_from(list(DATATYPES)), st.text(max_size=5), json_values),
        "data": tensors}))


infer_bodies = bodies({"inputs": st.one_of(st.lists(oip_tensors(), max_size=3), json_values)}, {
    "outputs": st.one_of(st.lists(st.fixed_dictionaries({"name": st.one_of(st.sampled_from(["y", "probabilities"]),
                                                                            json_values)}), max_size=2), json_values),
    "id": json_values,
})

# Byte-level damage spliced into a body.
TOKENS = (b"NaN", b"Infinity", b"-Infinity", b"nan", b"1e400", b"-1e400", b"1e-400", b"9" * 400, b"\xff",
          b"\xc3\x28", b"\xed\xa0\x80", b'"\\ud800"', b"\x00", b'{"b64": "!!!"}', b'"', b"[", b"]", b"{", b"}",
          b",", b":", b"\\", b"true", b"null")


@st.composite
def damaged(draw, bodies):
    body = dumps(draw(bodies))
    at = draw(st.integers(0, len(body)))
    how = draw(st.sampled_from(["truncate", "insert", "replace", "intact", "intact"]))
    if how == "truncate":
        return body[:at]
    if how == "intact":
        return body
    token = draw(st.one_of(st.sampled_from(TOKENS), st.binary(min_size=1, max_size=6)))
    return body[:at] + token + body[at + (draw(st.integers(1, 4)) if how == "replace" else 0):]


@FUZZ
@given(path=st.sampled_from(POST_PATHS), body=st.one_of(damaged(json_values), st.binary(max_size=200)))
def test_random_json_and_bytes(server, path, body):
    check(server, "POST", path, body)


@FUZZ
@given(path=st.sampled_from(POST_PATHS), body=st.one_of(damaged(predict_bodies), damaged(example_bodies)))
def test_predict_classify_and_regress_bodies(server, path, body):
    check(server, "POST", path, body)


@FUZZ
@given(path=st.sampled_from(POST_PATHS), body=damaged(infer_bodies))
def test_infer_bodies(server, path, body):
    check(server, "POST", path, body)


def nested(depth: int, closed: bool = True) -> bytes:
    return b"[" * depth + (b"1" + b"]" * depth if closed else b"")


BIG = DEFAULT_MAX_BODY_BYTES
PATHOLOGICAL: dict[str, bytes | Callable[[], bytes]] = {  # the biggest made when needed, not at collection
    "deep lists": b'{"instances": ' + nested(100_000) + b"}",
    "deep unclosed lists": b'{"instances": ' + nested(100_000, closed=False),
    "lists just inside orjson's depth limit": b'{"instances": ' + nested(1000) + b"}",
    "deep lists of strings": b'{"signature_name": "classify_x_to_y", "instances": ' + nested(900) + b"}",
    "deep objects": b'{"a": ' * 100_000 + b"1" + b"}" * 100_000,
    "deep examples": b'{"examples": [{"x": ' + nested(100_000) + b"}]}",
    "huge float": b'{"instances": [1e400, -1e400, 1e-400]}',
    "huge integer": b'{"instances": [' + b"9" * 5000 + b"]}",
    "integer past uint64": b'{"inputs": [18446744073709551616, -9223372036854775809]}',
    "bare NaN": b'{"instances": [NaN, Infinity, -Infinity]}',
    "bare NaN body": b"NaN",
    "empty body": b"",
    "invalid UTF-8": b'{"instances": ["\xff\xfe"]}',
    "lone surrogate": b'{"signature_name": "\\ud800", "instances": [1.0]}',
    "lone surrogate feature": b'{"signature_name": "regress_x_to_y", "examples": [{"\\udc00": "\\ud800"}], "x": NaN}',
    "truncated": b'{"instances": [1.0, 2',
    "scalar input": b'{"inputs": 1.0}',
    "scalar infer input": b'{"inputs": [{"name": "x", "shape": [], "datatype": "FP32", "data": [1.0]}]}',
    "infer shape overflowing int64": b'{"inputs": [{"name": "x", "shape": [4294967296, 4294967296], '
                                     b'"datatype": "FP32", "data": []}]}',
    "infer shape past numpy's limit": b'{"inputs": [{"name": "x", "shape": [0, 4611686018427387904], '
                                      b'"datatype": "FP32", "data": []}]}',
    "infer shape past uint64": b'{"inputs": [{"name": "x", "shape": [0, 18446744073709551616], '
                               b'"datatype": "FP32", "data": []}]}',
    "b64 garbage": b'{"signature_name": "classify_x_to_y", "instances": [{"b64": "!!!"}]}',
    "b64 not a string": b'{"signature_name": "classify_x_to_y", "inputs": {"b64": 5}}',
    "enormous string": lambda: b'{"instances": ["' + b"a" * (BIG - 20) + b'"]}',
    "over the limit": lambda: b'{"instances": ["' + b"a" * BIG + b'"]}',
}
BODY_PATHS = ("/v1/models/half_plus_two:predict", "/v1/models/half_plus_two:regress", "/v2/models/half_plus_two/infer")


@pytest.mark.parametrize("case, path", [(case, path) for case, body in PATHOLOGICAL.items() for path in BODY_PATHS
                                        if not callable(body) or path == BODY_PATHS[0]])  # one for the biggest
def test_pathological_bodies(server, case, path):
    body = PATHOLOGICAL[case]
    status, _ = check(server, "POST", path, body() if callable(body) else body)
    if case == "over the limit":
        assert status == 413
    if case.startswith("scalar") and "half_plus_two:regress" not in path:  # x is [-1]: a scalar does not fit
        assert status == 400, f"{case}: {status}"


PREFIXES = ("/v1/models/", "/v2/models/", "/v1/", "/v2/", "/", "//", "/v2/health/", "/monitoring/prometheus/")
SUFFIXES = (":predict", ":classify", ":regress", ":nope", ":", "/metadata", "/ready", "/infer", "", "/",
            "/versions/1", "/versions/99999999999999999999", "/versions/-1", "/labels/stable", "/labels/",
            "/versions/1/metadata", "/versions/1/infer", "?x=1", "#frag")
ODD = ("%00", "%zz", "%", "%e9", "%ed%a0%80", "%2F", "%3A", "..", ".", "//", ";", "%25", "~", "*", "'")


@st.composite
def paths(draw):
    """A request target in origin form ("/" and visible ASCII, what HTTP carries), from plausible
    to absurd."""
    segment = draw(st.one_of(st.sampled_from(MODELS), st.lists(st.sampled_from(ODD + MODELS), max_size=5).map("".join),
                             st.builds(quote, st.text(max_size=12), st.sampled_from(["", "/:%", "/"]))))
    path = draw(st.sampled_from(PREFIXES)) + segment + draw(st.sampled_from(SUFFIXES))
    if draw(st.integers(0, 9)) == 0:
        path += draw(st.sampled_from(["a", "/..", "%00", quote("é")])) * draw(st.integers(100, 3000))
    return path


# Registered methods (the HTTP parser, uvicorn's httptools where installed, knows no others).
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "CONNECT",
                           "PROPFIND", "MKCOL", "COPY", "MOVE", "LOCK", "PURGE", "REPORT", "M-SEARCH", "QUERY"])


@FUZZ
@given(method=methods, path=paths(), body=st.one_of(st.just(b""), st.just(b'{"instances": [1.0]}'),
                                                   damaged(predict_bodies)))
def test_random_paths_and_methods(server, method, path, body):
    check(server, method, path, body)


@pytest.mark.parametrize("path", ["/v1/models/" + "a" * 60_000, "/v1/models/half_plus_two/labels/" + "%ff" * 5000,
                                  "/v2/models/" + "../" * 5000 + "infer", "/" + "%00" * 10_000],
                         ids=["60k-name", "invalid-utf8-label", "dot-segments", "nul-bytes"])
def test_very_long_paths(server, path):
    check(server, "GET", path)
    check(server, "POST", path, b'{"instances": [1.0]}')


@pytest.mark.parametrize("method, path", [("A", "/v1/models/half_plus_two"), ("get", "/v1/models/half_plus_two"),
                                          ("FOO_BAR", "/v2/models/half_plus_two/infer"),
                                          ("GET", "/v1/models/" + "a" * 100_000)],
                         ids=["unknown-method", "lower-case-method", "method-with-underscore", "100k-path"])
def test_requests_the_http_parser_may_refuse(server, method, path):
    """Valid HTTP (any token is a method; no limit on a path's length) that httptools' parser (uvicorn's
    C parser, chosen for speed) refuses before Kiln sees it: a 400 with uvicorn's own plain-text
    message, or Kiln's JSON error where the parser lets it through; never a 5xx, and the server
    goes on (the last test checks)."""
    status, content_type, data = send(server, method, path, b"")
    assert status == 400, (status, data[:200])
    if content_type.startswith("application/json"):
        assert json.loads(data)["error"]
    else:
        assert data == b"Invalid HTTP request received."


# gRPC ------------------------------------------------------------------------------------------

PREDICT = "/tensorflow.serving.PredictionService/Predict"
METADATA = "/tensorflow.serving.PredictionService/GetModelMetadata"
STATUS = "/tensorflow.serving.ModelService/GetModelStatus"
BAD_CODES = ("INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED")  # a bug, a crash, a hang


def call(server: Server, method: str, request: bytes):
    """One unary call with raw bytes; the status code's name ("OK" on success)."""
    stub = server.channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        stub(request, timeout=TIMEOUT)
        return "OK"
    except grpc.RpcError as e:
        code = e.code().name
        assert code not in BAD_CODES, f"{method} {show(request)} -> {code}: {e.details()}\n{server.log()}"
        return code


# Values each typed field can hold on the wire.
FIELD_VALUES = {
    "float_val": st.floats(width=32), "double_val": st.floats(), "half_val": st.integers(-2**31, 2**31 - 1),
    "int_val": st.integers(-2**31, 2**31 - 1), "int64_val": st.integers(-2**63, 2**63 - 1),
    "uint32_val": st.integers(0, 2**32 - 1), "uint64_val": st.integers(0, 2**64 - 1), "bool_val": st.booleans(),
    "scomplex_val": st.floats(width=32), "dcomplex_val": st.floats(), "string_val": st.binary(max_size=8),
}
# Tiny, or too many elements to hold (never an allocatable giant: see the module's docstring).
proto_dims = st.one_of(st.integers(0, 4), st.sampled_from([-1, 28, 2**62, 2**63 - 1]))


@st.composite
def tensor_protos(draw):
    """A well-formed TensorProto: a real array of the signatures' shapes, or any dtype enum, shape
    and typed field or tensor_content, consistent or not."""
    if draw(st.booleans()):
        dtype = draw(st.sampled_from([d.name for d in DTYPES.values()] + ["object"]))
        shape = draw(st.sampled_from(SHAPES))
        array = np.full(shape, b"x" if dtype == "object" else draw(st.sampled_from([0, 1, 255]))).astype(dtype)
        message = TensorProto()
        from_ndarray(array, message)
        return message
    dtype = draw(st.one_of(st.sampled_from(sorted(DTYPES) + [7]), st.integers(0, 30), st.just(101)))
    message = TensorProto(dtype=dtype)
    message.tensor_shape.unknown_rank = draw(st.integers(0, 9)) == 0
    for size in draw(st.lists(proto_dims, max_size=4)):
        message.tensor_shape.dim.add(size=size)
    field = draw(st.one_of(st.just(VALUE_FIELD.get(dtype, "string_val" if dtype == 7 else "float_val")),
                           st.sampled_from(sorted(FIELD_VALUES))))
    getattr(message, field).extend(draw(st.lists(FIELD_VALUES[field], max_size=6)))
    if draw(st.integers(0, 3)) == 0:
        message.tensor_content = draw(st.binary(max_size=40))
    return message


@st.composite
def model_specs(draw, spec):
    spec.name = draw(st.one_of(st.sampled_from(MODELS), st.text(max_size=8)))
    spec.signature_name = draw(st.one_of(st.sampled_from(SIGNATURES), st.text(max_size=8)))
    choice = draw(st.sampled_from(["version", "label", None]))
    if choice == "version":
        spec.version.value = draw(st.one_of(st.integers(-1, 2), st.integers(-2**63, 2**63 - 1)))
    elif choice == "label":
        spec.version_label = draw(st.text(max_size=8))
    return spec


@st.composite
def grpc_requests(draw):
    """(method, a serialized well-formed request for it)."""
    method = draw(st.sampled_from([PREDICT, METADATA, STATUS]))
    if method == PREDICT:
        request = _predict.PredictRequest()
        for name in draw(st.lists(input_names, max_size=3, unique=True)):
            request.inputs[name].CopyFrom(draw(tensor_protos()))
        request.output_filter.extend(draw(st.lists(st.sampled_from(["y", "probabilities", ""]), max_size=2)))
    elif method == METADATA:
        request = _metadata.GetModelMetadataRequest()
        request.metadata_field.extend(draw(st.lists(st.sampled_from(["signature_def", "x", ""]), max_size=2)))
    else:
        request = _status.GetModelStatusRequest()
    draw(model_specs(request.model_spec))
    return method, request.SerializeToString()


@FUZZ
@given(grpc_requests())
def test_grpc_well_formed_requests(server, case):
    call(server, *case)


@FUZZ
@given(method=st.sampled_from([PREDICT, METADATA, STATUS, "/tensorflow.serving.PredictionService/Classify",
                               "/tensorflow.serving.PredictionService/Regress"]),
       request=st.one_of(st.binary(max_size=300), grpc_requests().map(lambda case: case[1]).flatmap(
           lambda raw: st.builds(lambda at, junk: raw[:at] + junk + raw[at:], st.integers(0, len(raw)),
                                 st.binary(min_size=1, max_size=4)))))
def test_grpc_random_bytes(server, method, request):
    """Bytes that may not parse as the request message: a client's error (INVALID_ARGUMENT), not
    the server's (INTERNAL or UNKNOWN)."""
    call(server, method, request)


# Seeded mutator and named cases ---------------------------------------------------------------

MUTATOR_BODIES = 5_000  # per seed: 20,000 in all, REST and gRPC


@pytest.mark.parametrize("seed", range(4))
def test_seeded_mutator(server, seed):
    """load/fuzz.py's mutator (its benchmark runs the same for 100,000+): every answer a 4xx JSON error
    or a success, and enough successes that the damage reaches the models, not only the parsers."""
    report = fuzz(server.host, server.port, server.grpc_port, MUTATOR_BODIES, seed=seed)
    assert report.bodies == MUTATOR_BODIES
    assert not report.failures, "\n".join(report.failures[:20]) + f"\n{len(report.failures)} failures\n{server.log()}"
    assert report.rest["2xx"] > MUTATOR_BODIES // 50 and report.grpc["OK"] > 0, report.summary()


SURROGATE = b"\xed\xa0\x80"  # U+D800 as UTF-8 bytes: not Unicode; orjson refused it, the fallback took it
X = b'{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}'
CLASSIFY = b'"signature_name": "classify_x_to_y"'
BINARY_HEADER = b'{"id": "' + SURROGATE + b'", "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", ' \
                                          b'"parameters": {"binary_data_size": 4}}]}'
NAMED_CASES = {  # (path, body, headers, words of the error); each answered 500 (or 200) before its fix
    "surrogate signature_name": ("/v1/models/half_plus_two:predict",
                                 b'{"signature_name": "' + SURROGATE + b'", "instances": [1.0]}', {}, "UTF-8"),
    "surrogate prompt": ("/v1/models/tiny_lm:generate", b'{"prompt": "' + SURROGATE + b'", "max_tokens": 1}', {},
                         "UTF-8"),
    "surrogate example": ("/v1/models/half_plus_two:classify",
                          b"{" + CLASSIFY + b', "examples": [{"x": "' + SURROGATE + b'"}]}', {}, "UTF-8"),
    "surrogate infer id": ("/v2/models/half_plus_two/infer", b'{"id": "' + SURROGATE + b'", "inputs": [' + X + b"]}",
                           {}, "ed a0 80"),
    "surrogate binary header": ("/v2/models/half_plus_two/infer", BINARY_HEADER + b"\0\0\x80?",
                                {"Inference-Header-Content-Length": str(len(BINARY_HEADER))}, "UTF-8"),
    "number in a string input": ("/v1/models/half_plus_two:predict", b"{" + CLASSIFY + b', "instances": [1, 2]}', {},
                                 "input 'inputs' must hold strings or {\"b64\": \"...\"} objects, got 1 (int)"),
    "ragged string input": ("/v1/models/half_plus_two:predict",
                            b"{" + CLASSIFY + b', "inputs": {"inputs": [["a"], ["a", "b"]]}}', {},
                            "input 'inputs' cannot be read as a string tensor of one shape"),
    "number in OIP BYTES": ("/v2/models/half_plus_two/infer", b'{"parameters": {' + CLASSIFY + b'}, "inputs": '
                            b'[{"name": "inputs", "shape": [2], "datatype": "BYTES", "data": [1, "a"]}]}', {},
                            "input 'inputs': BYTES data must hold strings, got 1 (int)"),
    "example int past int64": ("/v1/models/half_plus_two:regress",
                               b'{"signature_name": "regress_x_to_y", "examples": [{"x": 1' + b"0" * 400 + b"}]}", {},
                               "feature 'x': integers must fit in int64"),
    "example int past float": ("/v1/models/half_plus_two:regress", b'{"signature_name": "regress_x_to_y", '
                               b'"examples": [{"x": [0.5, 1' + b"0" * 400 + b"]}]}", {},
                               "feature 'x': 1000"),
    "non-ASCII b64 example": ("/v1/models/half_plus_two:classify",
                              b"{" + CLASSIFY + b', "examples": [{"x": {"b64": "\xc3\xa9"}}]}', {},
                              "feature 'x': invalid base64"),
    "temperature 10^400": ("/v1/models/tiny_lm:generate",
                           b'{"prompt": "a", "max_tokens": 1, "temperature": 1' + b"0" * 400 + b"}", {},
                           "'temperature' must be a finite number"),
    "bool in OIP shape": ("/v2/models/half_plus_two/infer",
                          b'{"inputs": [{"name": "x", "shape": [true], "datatype": "FP32", "data": [1.0]}]}', {},
                          "input 'x': 'shape' must be a list of non-negative integers, got [True]"),
}


@pytest.mark.parametrize("case", NAMED_CASES)
def test_bad_input_is_a_400_naming_it(server, case):
    path, body, headers, words = NAMED_CASES[case]
    status, answer = check(server, "POST", path, body, headers)
    assert status == 400 and words in answer["error"], (status, answer)


def test_a_shape_too_big_for_the_signatures_dtype_is_invalid_argument(server):
    """uint8 [0, 2**62] holds nothing, and numpy holds it, but not as the digits' float32 (found by
    load/fuzz.py: INTERNAL before)."""
    request = _predict.PredictRequest()
    request.model_spec.name = "digits"
    tensor = request.inputs["images"]
    tensor.dtype = 4
    for size in (0, 2**62):
        tensor.tensor_shape.dim.add(size=size)
    assert call(server, PREDICT, request.SerializeToString()) == "INVALID_ARGUMENT"


def test_an_error_that_cannot_be_written_is_still_json():
    """The error path itself cannot fail: a message quoting text JSON cannot hold, or an exception
    whose str() raises, still makes {"error": "..."} (before: orjson raised inside error_response)."""
    from runtime.exchange import error_response
    from runtime.errors import InvalidInput

    class Unprintable(Exception):
        def __str__(self):
            raise RuntimeError("no")

    response = error_response(InvalidInput("signature '\ud800' not found"))
    assert response.status == 400 and json.loads(response.body) == {"error": "signature '\\ud800' not found"}
    response = error_response(Unprintable())
    assert response.status == 500 and json.loads(response.body) == {"error": "Unprintable (no message)"}


# Afterwards ------------------------------------------------------------------------------------

def test_server_still_serves(server):
    """Runs last: the process survived everything above and still answers correctly."""
    assert server.process.poll() is None, server.log()
    status, answer = check(server, "POST", "/v1/models/half_plus_two:predict", b'{"instances": [1.0, 2.0, 5.0]}')
    assert (status, answer) == (200, {"predictions": [2.5, 3.0, 4.5]})
    status, answer = check(server, "POST", "/v2/models/half_plus_two/infer",
                           dumps({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}]}))
    assert status == 200 and answer["outputs"][0]["data"] == [2.5, 3.0]
    request = _predict.PredictRequest()
    request.model_spec.name = "half_plus_two"
    from_ndarray(np.array([1.0, 5.0], np.float32), request.inputs["x"])
    stub = server.channel.unary_unary(PREDICT, request_serializer=None, response_deserializer=None)
    response = _predict.PredictResponse.FromString(stub(request.SerializeToString(), timeout=TIMEOUT))
    assert np.frombuffer(response.outputs["y"].tensor_content, np.float32).tolist() == [2.5, 4.5]
