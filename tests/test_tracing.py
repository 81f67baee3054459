"""Tracing on `kiln serve`: spans exported to a real OTLP receiver on loopback (OTLP/gRPC: the
collector's TraceService from opentelemetry-proto, served by grpcio in this process; OTLP/HTTP: a
plain HTTP server decoding the same protobuf), a client's W3C traceparent continued over REST and
gRPC, and the trace fields of the JSON log lines (Cloud Logging's, with the project from
GOOGLE_CLOUD_PROJECT or from a metadata server, which is simulated here: a loopback HTTP server
answering the one path Kiln asks, reached through google-auth's GCE_METADATA_HOST)."""

from __future__ import annotations

import json
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from tests.conftest import free_port, kiln_serve, run_python

grpc = pytest.importorskip("grpc")
httpx = pytest.importorskip("httpx")
pytest.importorskip("opentelemetry.sdk")
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.trace import SpanKind, set_span_in_context  # noqa: E402
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator  # noqa: E402


def _spans(request: trace_service_pb2.ExportTraceServiceRequest):
    for resource_spans in request.resource_spans:
        service = next((a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), "")
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                yield service, span


class Received:
    """Spans as an OTLP receiver got them: (service.name, Span protobuf)."""

    def __init__(self):
        self.spans: list = []
        self.arrived = threading.Condition()

    def add(self, request) -> None:
        with self.arrived:
            self.spans.extend(_spans(request))
            self.arrived.notify_all()

    def wait_for(self, match, names: set[str], seconds: float = 30) -> dict[str, list]:
        """The spans match(span) accepts, by name, once every name in `names` has arrived."""
        deadline = time.monotonic() + seconds
        with self.arrived:
            while True:
                found: dict[str, list] = {}
                for service, span in self.spans:
                    if match(span):
                        found.setdefault(span.name, []).append((service, span))
                if names <= set(found):
                    return found
                if not self.arrived.wait(max(0.0, deadline - time.monotonic())):
                    pytest.fail(f"spans {sorted(names - set(found))} not exported; got {sorted(found)}")


@pytest.fixture
def otlp_grpc():
    """OTLP/gRPC: the collector's TraceService on a loopback port."""
    received = Received()

    class Service(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            received.add(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"http://127.0.0.1:{port}", received
    server.stop(None)


def _http_server(answer):
    """A loopback HTTP server whose handler is answer(handler) (POST and GET); yields its address."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            answer(self)

        do_GET = do_POST

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def otlp_http():
    """OTLP/HTTP: POST /v1/traces with an ExportTraceServiceRequest (application/x-protobuf)."""
    received = Received()

    def answer(handler):
        body = handler.rfile.read(int(handler.headers["Content-Length"]))
        if handler.path != "/v1/traces" or handler.headers["Content-Type"] != "application/x-protobuf":
            handler.send_response(404)
        else:
            received.add(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
            handler.send_response(200)
        handler.send_header("Content-Type", "application/x-protobuf")
        handler.end_headers()
        handler.wfile.write(trace_service_pb2.ExportTraceServiceResponse().SerializeToString())

    server = _http_server(answer)
    yield f"http://127.0.0.1:{server.server_port}", received
    server.shutdown()


@pytest.fixture
def metadata_server():
    """The simulated metadata server: the project id, to requests that carry Metadata-Flavor: Google."""

    def answer(handler):
        ok = handler.path == "/computeMetadata/v1/project/project-id" and handler.headers["Metadata-Flavor"] == "Google"
        handler.send_response(200 if ok else 403)
        handler.end_headers()
        handler.wfile.write(b"metadata-project" if ok else b"")

    server = _http_server(answer)
    yield f"127.0.0.1:{server.server_port}"
    server.shutdown()


def _client_span(name: str):
    """A span of the test's own tracer (the client's side), and the headers a client sends for it."""
    tracer = TracerProvider().get_tracer("test-client")
    span = tracer.start_span(name, kind=SpanKind.CLIENT)
    headers: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(headers, context=set_span_in_context(span))
    return span, headers


def _log_lines(process) -> list[dict]:
    lines = []
    for line in process.log_path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            pass
    return lines


def _wait_for_line(process, predicate, seconds: float = 10) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for line in _log_lines(process):
            if predicate(line):
                return line
        time.sleep(0.1)
    pytest.fail(f"no such log line in {process.log_path.read_text()[-3000:]}")


OTEL = {"OTEL_BSP_SCHEDULE_DELAY": "100", "KILN_ACCESS_LOG": "true"}


def test_rest_request_continues_the_callers_trace(examples, tmp_path, otlp_grpc):
    endpoint, received = otlp_grpc
    env = {**OTEL, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
           "OTEL_SERVICE_NAME": "kiln-traced", "GOOGLE_CLOUD_PROJECT": "kiln-test"}
    with kiln_serve(examples, tmp_path, env=env) as (process, url):
        client, headers = _client_span("predict digits")
        response = httpx.post(f"{url}/v1/models/digits:predict", headers=headers,
                              json={"instances": [[[[0.0]] * 28] * 28]}, timeout=30)
        client.end()
        assert response.status_code == 200, response.text
        context = client.get_span_context()
        trace_hex = f"{context.trace_id:032x}"
        spans = received.wait_for(lambda span: span.trace_id == context.trace_id.to_bytes(16, "big"),
                                  {"POST /v1/models/digits:predict", "kiln.run", "kiln.queue"})

        (service, server), = spans["POST /v1/models/digits:predict"]
        assert service == "kiln-traced"
        assert server.parent_span_id == context.span_id.to_bytes(8, "big")  # the client's span is the parent
        assert server.kind == server.SPAN_KIND_SERVER
        attributes = {a.key: a.value for a in server.attributes}
        assert attributes["kiln.model"].string_value == "digits"
        assert attributes["kiln.model_version"].string_value == "1"
        assert attributes["kiln.signature"].string_value == "serving_default"
        assert attributes["http.response.status_code"].int_value == 200
        (_, run), = spans["kiln.run"]
        assert run.parent_span_id == server.span_id
        (_, waited), = spans["kiln.queue"]  # batching is on: the wait in the batcher's queue
        assert waited.parent_span_id == run.span_id and waited.end_time_unix_nano >= waited.start_time_unix_nano
        # Out: the server's span, for the caller to carry on from.
        assert response.headers["traceparent"] == f"00-{trace_hex}-{server.span_id.hex()}-01"

        # The batch that ran it is its own span, linked to the request's.
        (_, batch), = received.wait_for(lambda span: any(link.span_id == run.span_id for link in span.links),
                                        {"kiln.batch"})["kiln.batch"]
        assert batch.trace_id != server.trace_id  # a batch may serve several traces: linked, not a child

        line = _wait_for_line(process, lambda entry: entry.get("logger") == "kiln.access"
                              and "digits:predict" in entry["message"])
        assert line["logging.googleapis.com/trace"] == f"projects/kiln-test/traces/{trace_hex}"
        assert line["logging.googleapis.com/spanId"] == server.span_id.hex()
        assert line["logging.googleapis.com/trace_sampled"] is True

        # A malformed traceparent starts a new trace rather than failing the request.
        refused = httpx.post(f"{url}/v1/models/half_plus_two:predict", headers={"traceparent": "00-nonsense"},
                             json={"instances": [1.0]}, timeout=30)
        assert refused.status_code == 200
        assert refused.headers["traceparent"].split("-")[1] != trace_hex


def test_grpc_call_continues_the_callers_trace(examples, tmp_path, otlp_http):
    pytest.importorskip("tensorflow_serving")
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    endpoint, received = otlp_http
    grpc_port = free_port()
    env = {**OTEL, "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}  # OTLP/HTTP: the specification's default protocol
    with kiln_serve(examples, tmp_path, "--grpc-port", str(grpc_port), env=env) as (process, _):
        client, headers = _client_span("grpc predict")
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "half_plus_two"
        tensor = request.inputs["x"]
        tensor.dtype = 1  # DT_FLOAT
        tensor.tensor_shape.dim.add().size = 3
        tensor.float_val.extend([1.0, 2.0, 5.0])
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            response, call = stub.Predict.with_call(request, metadata=tuple(headers.items()), timeout=30)
        client.end()
        output = response.outputs["y"]
        assert list(output.float_val or np.frombuffer(output.tensor_content, np.float32)) == [2.5, 3.0, 4.5]
        context = client.get_span_context()
        spans = received.wait_for(lambda span: span.trace_id == context.trace_id.to_bytes(16, "big"), {"gRPC predict", "kiln.run"})
        (service, server), = spans["gRPC predict"]
        assert service == "kiln"
        assert server.parent_span_id == context.span_id.to_bytes(8, "big")
        attributes = {a.key: a.value for a in server.attributes}
        assert attributes["kiln.model"].string_value == "half_plus_two"
        assert attributes["kiln.status"].string_value == "OK"
        assert attributes["rpc.system"].string_value == "grpc"
        assert spans["kiln.run"][0][1].parent_span_id == server.span_id
        trailers = dict(call.trailing_metadata())
        assert trailers["traceparent"] == f"00-{context.trace_id:032x}-{server.span_id.hex()}-01"
        line = _wait_for_line(process, lambda entry: entry.get("message") == "gRPC predict OK")
        assert line["trace_id"] == f"{context.trace_id:032x}"  # no Google Cloud project: plain trace fields
        assert line["span_id"] == server.span_id.hex()


def test_cloud_run_log_lines_carry_the_trace_of_cloud_runs_front_end(examples, tmp_path, metadata_server):
    """The Cloud Run service (functions-framework, as its image runs it) without OTEL_* variables: no
    spans, no traceparent out, but the lines logged for a request Cloud Run's front end marked
    (X-Cloud-Trace-Context; its span id in decimal) carry its trace, under the project the metadata
    server names (simulated; K_SERVICE says this is Cloud Run, as Cloud Run sets it)."""
    from tests.conftest import install_examples, stop, wait_until_up
    from tests.test_cloud_run import functions_framework, kiln_env

    install_examples(examples, tmp_path / "models")
    port, log = free_port(), tmp_path / "service.log"
    env = kiln_env(tmp_path, "http://127.0.0.1:9", KILN_MODEL_REPOSITORY=str(tmp_path / "models"),
                   KILN_ACCESS_LOG="true", K_SERVICE="kiln-svc", GCE_METADATA_HOST=metadata_server)
    for name in ("GOOGLE_CLOUD_PROJECT", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_EXPORTER"):
        env.pop(name, None)
    process = functions_framework(port, env, log)
    process.log_path = log
    url = f"http://127.0.0.1:{port}"
    wait_until_up(process, lambda: httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200, log,
                  "functions-framework")
    try:
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        response = httpx.post(f"{url}/v1/models/half_plus_two:predict", json={"instances": [1.0]}, timeout=30,
                              headers={"X-Cloud-Trace-Context": f"{trace_id}/12345678901234567890;o=1"})
        assert response.status_code == 200
        assert "traceparent" not in response.headers
        line = _wait_for_line(process, lambda entry: "half_plus_two:predict" in entry.get("message", ""))
        assert line["logging.googleapis.com/trace"] == f"projects/metadata-project/traces/{trace_id}"
        assert line["logging.googleapis.com/spanId"] == f"{12345678901234567890:016x}"
        assert line["logging.googleapis.com/trace_sampled"] is True
        untraced = httpx.get(f"{url}/v1/models/half_plus_two", timeout=30)
        assert untraced.status_code == 200
        line = _wait_for_line(process, lambda entry: entry.get("message") == "GET /v1/models/half_plus_two 200")
        assert not any(key.startswith("logging.googleapis.com/") for key in line)
    finally:
        stop(process)


def test_tracing_off_imports_no_opentelemetry():
    """Start-up time: without OTEL_* variables the serving path never imports the SDK (or the API)."""
    result = run_python("import sys; from runtime import tracing; import runtime.app, handlers.grpc.server; "
                        "tracing.configure({}); "
                        "assert tracing.start({'traceparent': '00-' + '1' * 32 + '-' + '2' * 16 + '-01'}, 'x') "
                        "is not None; print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_an_exporter_kiln_cannot_honour_is_logged_by_name_and_spans_stay_off():
    result = run_python("import logging; logging.basicConfig(); from runtime import tracing; "
                        "tracing.configure({'OTEL_TRACES_EXPORTER': 'zipkin'}); print(tracing.enabled())")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    assert "OTEL_TRACES_EXPORTER='zipkin'" in result.stderr and "otlp" in result.stderr
