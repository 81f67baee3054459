"""Connections bounded in time and number, over a real `kiln serve` (issue 13): idle, slowloris and
slow-body clients are closed by the header and body timeouts (408 JSON where a request began), the
connection cap answers 503 JSON, keep-alive outlives the header timeout, every transport error is
JSON; gRPC refuses oversized messages and unauthenticated calls before decoding them."""

from __future__ import annotations

import socket
import time

import orjson
import pytest

from tests.conftest import free_port, kiln_serve

psutil = pytest.importorskip("psutil")

KEY = "connections-key"
HEADER_TIMEOUT = 1.0  # short, so the test is fast; the defaults are runtime.settings'
BODY_TIMEOUT = 1.0
KEEPALIVE = 4.0
MAX_CONNECTIONS = 6
MAX_BODY = 1 << 20


@pytest.fixture(scope="module")
def server(examples, tmp_path_factory):
    """(process, REST host and port, gRPC port) of a server with short timeouts and API keys."""
    grpc_port = free_port()
    env = {"KILN_API_KEYS": f"tenant-a:{KEY}", "KILN_HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT),
           "KILN_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT), "KILN_KEEPALIVE_TIMEOUT_SECONDS": str(KEEPALIVE),
           "KILN_MAX_CONNECTIONS": str(MAX_CONNECTIONS), "KILN_MAX_BODY_BYTES": str(MAX_BODY)}
    with kiln_serve(examples, tmp_path_factory.mktemp("repository"), "--grpc-port", str(grpc_port),
                    env=env) as (process, url):
        host, _, port = url.removeprefix("http://").rpartition(":")
        yield process, (host, int(port)), grpc_port


def _connect(address) -> socket.socket:
    connection = socket.create_connection(address, timeout=10)
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection


def _request(path: str = "/v1/models/half_plus_two", *, method: str = "GET", body: bytes = b"",
             headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: kiln", f"Authorization: Bearer {KEY}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _read_response(connection: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response (Content-Length framed) from the connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        assert chunk, f"the connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    while len(body) < int(headers["content-length"]):
        chunk = connection.recv(65536)
        assert chunk, "the connection closed inside a response body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def _closed_within(connection: socket.socket, seconds: float) -> bytes:
    """What the server sent before closing the connection; fails if it is still open after `seconds`."""
    connection.settimeout(seconds)
    received = b""
    try:
        while chunk := connection.recv(65536):
            received += chunk
    except socket.timeout:
        pytest.fail(f"the server kept the connection open for {seconds} s (received {received!r})")
    except ConnectionResetError:
        pass
    return received


def _json_error(raw: bytes, status: int) -> dict:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), raw
    assert b"content-type: application/json" in head.lower(), raw
    return orjson.loads(body)


def test_idle_connection_is_closed(server):
    _, address, _ = server
    with _connect(address) as connection:
        assert _closed_within(connection, HEADER_TIMEOUT + 5) == b""  # no request: nothing to answer


def test_slowloris_headers_are_cut_off_with_408(server):
    _, address, _ = server
    request = _request()
    with _connect(address) as connection:
        started = time.monotonic()
        for byte in request[:-4]:  # a byte every 0.1 s: each arrives well within the timeout, the whole not
            try:
                connection.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.1)
            if time.monotonic() - started > HEADER_TIMEOUT + 5:
                pytest.fail("the server still reads headers sent a byte at a time past the header timeout")
        assert "error" in _json_error(_closed_within(connection, 5), 408)


def test_slow_body_is_answered_408_and_closed(server):
    _, address, _ = server
    head = _request("/v1/models/half_plus_two:predict", method="POST", headers={"Content-Length": str(100 << 20)})
    with _connect(address) as connection:  # declares 100 MiB, sends 20 bytes
        connection.sendall(head + b'{"instances": [1.0, ')
        error = _json_error(_closed_within(connection, BODY_TIMEOUT + 5), 408)
    assert "body" in error["error"]


def test_keep_alive_outlives_the_header_timeout(server):
    _, address, _ = server
    with _connect(address) as connection:
        connection.sendall(_request())
        assert _read_response(connection)[0] == 200
        time.sleep(HEADER_TIMEOUT * 2)  # idle between requests: the keep-alive timeout applies, not the header one
        connection.sendall(_request())
        assert _read_response(connection)[0] == 200


def test_slow_clients_hold_no_descriptors(server):
    process, address, _ = server
    server_process = psutil.Process(process.pid)
    before = server_process.num_fds()
    slow = [_connect(address) for _ in range(20)]
    try:
        for i, connection in enumerate(slow):
            connection.sendall(_request()[:i])  # part of the headers, or (i == 0) nothing
        time.sleep(0.3)
        assert server_process.num_fds() >= before + 15  # the server holds them now (give or take its own)
        for connection in slow:
            _closed_within(connection, HEADER_TIMEOUT + 5)
    finally:
        for connection in slow:
            connection.close()
    deadline = time.monotonic() + 5
    while server_process.num_fds() > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server_process.num_fds() <= before


def test_connections_over_the_cap_get_503_json(server):
    _, address, _ = server
    held = [_connect(address) for _ in range(MAX_CONNECTIONS)]
    try:
        for connection in held:  # each served, then idle on keep-alive
            connection.sendall(_request())
            assert _read_response(connection)[0] == 200
        with _connect(address) as extra:
            extra.sendall(_request())
            assert "error" in _json_error(_closed_within(extra, 5), 503)
    finally:
        for connection in held:
            connection.close()


@pytest.mark.parametrize("request_id", ["caf\u00e9-\u2603", "\u00ff\u00fe"])
def test_non_ascii_request_id_gets_json(server, request_id):
    _, address, _ = server
    with _connect(address) as connection:
        raw = _request("/v1/models/nonexistent").replace(b"Host: kiln", b"Host: kiln\r\nX-Request-Id: "
                                                         + request_id.encode())
        connection.sendall(raw)
        status, headers, body = _read_response(connection)
    assert status == 404 and headers["content-type"] == "application/json"
    assert "error" in orjson.loads(body)
    echoed = headers["x-request-id"].encode("latin-1")
    assert echoed == request_id.encode() or echoed.isascii()  # the bytes sent back as sent, or a fresh id


def test_invalid_http_is_answered_400_json(server):
    _, address, _ = server
    with _connect(address) as connection:
        connection.sendall(b"NOT HTTP AT ALL\x00\r\n\r\n")
        assert "error" in _json_error(_closed_within(connection, 5), 400)


class _Core:
    """A stand-in for runtime.app.App whose answer fails or carries a header HTTP cannot."""

    max_body_bytes = 1 << 10

    def __init__(self, answer):
        self.answer = answer

    async def respond(self, request, refused=None):
        return self.answer()


def _through_adapter(core) -> list[dict]:
    import asyncio

    from handlers.local import AsgiApp

    sent = []

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/models/m:predict", "headers": [(b"x-request-id", b"\xff")]}
    asyncio.run(AsgiApp(core)(scope, receive, send))
    return sent


def test_adapter_answers_json_when_the_core_fails():
    """An exception escaping the core (as one raised while building an error body) is a JSON 500,
    never uvicorn's plain-text one."""

    def fail():
        raise TypeError("str is not valid UTF-8: surrogates not allowed")

    start, body = _through_adapter(_Core(fail))
    assert start["status"] == 500 and (b"content-type", b"application/json") in start["headers"]
    assert orjson.loads(body["body"]) == {"error": "internal error"}


def test_adapter_drops_a_header_http_cannot_carry():
    from runtime.exchange import Response

    start, body = _through_adapter(_Core(lambda: Response(200, b"{}", {"Content-Type": "application/json",
                                                                       "X-Echo": "a\r\nSet-Cookie: x",
                                                                       "X-Name": "caf\u00e9 \u2603"})))
    headers = dict(start["headers"])
    assert start["status"] == 200 and b"x-echo" not in headers
    assert headers[b"x-name"] == "caf\u00e9 \u2603".encode("utf-8")


# gRPC --------------------------------------------------------------------------------------------

grpc = pytest.importorskip("grpc")


@pytest.fixture(scope="module")
def channel(server):
    _, _, grpc_port = server
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=[("grpc.max_send_message_length", -1)])
    yield channel
    channel.close()


def _oip():
    from runtime.protos import generated_module

    return generated_module("grpc_service_pb2"), generated_module("grpc_service_pb2_grpc")


def test_grpc_health_is_open_and_predict_needs_a_key(channel):
    pytest.importorskip("tensorflow_serving")
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    service, service_grpc = _oip()
    stub = service_grpc.GRPCInferenceServiceStub(channel)
    assert stub.ServerLive(service.ServerLiveRequest(), timeout=5).live
    assert stub.ServerReady(service.ServerReadyRequest(), timeout=5).ready
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "half_plus_two"
    predict = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict
    with pytest.raises(grpc.RpcError) as refused:
        predict(request, timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as refused:
        predict(request, timeout=5, metadata=(("authorization", "Bearer wrong"),))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_grpc_refuses_before_decoding(channel):
    """Bytes that are no PredictRequest, without a key: refused for the key, not for the bytes (which
    would mean they were parsed first)."""
    raw = channel.unary_unary("/tensorflow.serving.PredictionService/Predict")
    with pytest.raises(grpc.RpcError) as refused:
        raw(b"\xff\xff\xff", timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_grpc_message_over_the_body_limit_is_refused(server, channel):
    process, _, _ = server
    raw = channel.unary_unary("/tensorflow.serving.PredictionService/Predict")
    before = psutil.Process(process.pid).memory_info().rss
    with pytest.raises(grpc.RpcError) as refused:
        raw(b"\x00" * (64 << 20), timeout=30, metadata=(("authorization", f"Bearer {KEY}"),))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert psutil.Process(process.pid).memory_info().rss - before < 32 << 20


def test_grpc_idle_connection_is_closed_after_the_keepalive_timeout(server):
    """The server's max-connection-idle: a channel idle past it is sent away (GOAWAY) and goes IDLE."""
    _, _, grpc_port = server
    service, service_grpc = _oip()
    states = []
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as idle:
        idle.subscribe(states.append)
        assert service_grpc.GRPCInferenceServiceStub(idle).ServerLive(service.ServerLiveRequest(), timeout=5).live
        # The callbacks come from grpc's own thread, perhaps late: the channel's first state (IDLE) can be
        # the only one seen when the call returns. Wait for READY first, then for IDLE after it.
        deadline = time.monotonic() + KEEPALIVE + 10
        while grpc.ChannelConnectivity.READY not in states and time.monotonic() < deadline:
            time.sleep(0.05)
        assert grpc.ChannelConnectivity.READY in states, f"the channel never reported READY: {states}"
        while states[-1] != grpc.ChannelConnectivity.IDLE and time.monotonic() < deadline:
            time.sleep(0.2)
        assert states[-1] == grpc.ChannelConnectivity.IDLE, f"the server kept an idle connection open: {states}"


def test_grpc_connection_that_sends_nothing_is_closed(server):
    _, address, grpc_port = server
    with _connect((address[0], grpc_port)) as connection:
        _closed_within(connection, HEADER_TIMEOUT + 5)
