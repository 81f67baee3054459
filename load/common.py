"""What the benchmarks share: the example servables, JSON output, PNG plots."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def example_servables(repository: Path, models: list[str]):
    """Build (or take from the cache) the example servables the benchmark needs."""
    from examples.build import build_examples

    return build_examples(repository, models)


def compile_bytecode() -> None:
    """Compile Kiln's modules to bytecode, as `pip install` does and as a container image holds them.

    A checkout run under PYTHONDONTWRITEBYTECODE (this machine sets it) keeps no bytecode, so every
    fresh process would compile Kiln's source again (about 0.1 s of a cold start, measured), while
    TensorFlow, an installed package, starts from its bytecode: cold starts compare installs."""
    import compileall

    for package in ("runtime", "handlers"):
        compileall.compile_dir(ROOT / package, quiet=1)


def write_results(name: str, results: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return path


def tfserving_requests(model: str, inputs: dict, signature: str = "serving_default") -> tuple[bytes, object]:
    """What a TensorFlow Serving client sends for `inputs` (arrays with the batch dimension): the
    REST predict body in row format, values as Python floats (json.dumps(x.tolist())), and the gRPC
    PredictRequest with packed tensor_content, byte for byte what tf.make_tensor_proto writes."""
    import orjson

    from runtime.codecs.tensor_proto import from_ndarray
    from runtime.protos import generated_module

    request = generated_module("tensorflow_serving.apis.predict_pb2").PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    for name, array in inputs.items():
        from_ndarray(array, request.inputs[name])
    if len(inputs) == 1:
        instances = next(iter(inputs.values())).tolist()
    else:
        rows = len(next(iter(inputs.values())))
        instances = [{name: array[i].tolist() for name, array in inputs.items()} for i in range(rows)]
    return orjson.dumps({"instances": instances}), request


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback TCP ports (each is held until all are found)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@contextmanager
def moto_server():
    """moto's S3-compatible server on a free loopback port, in its own process so it does not
    share the benchmark's interpreter lock; points boto3 at it and yields its endpoint URL."""
    (port,) = free_ports(1)
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.update(AWS_ENDPOINT_URL_S3=endpoint, AWS_ACCESS_KEY_ID="testing",
                          AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
        yield endpoint
    finally:
        server.terminate()
        server.wait()


class ServerError(RuntimeError):
    """`kiln serve` answered an error, or did not start: the run stops and says why."""


class HttpConnection:
    """One keep-alive HTTP/1.1 connection that POSTs the same prepared request again and again."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, request: bytes):
        self.reader, self.writer, self.path, self.request = reader, writer, path, request

    @classmethod
    async def open(cls, port: int, path: str, body: bytes) -> HttpConnection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        return cls(reader, writer, path, head.encode() + body)

    async def post(self) -> bytes:
        self.writer.write(self.request)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = CONTENT_LENGTH.search(head)
        if length is None:
            raise ServerError(f"POST {self.path}: a response without Content-Length: {head!r}")
        body = await self.reader.readexactly(int(length[1]))
        if not head.startswith(b"HTTP/1.1 200 "):
            status = head.split(b"\r\n", 1)[0].decode()
            raise ServerError(f"POST {self.path} answered {status}: {body.decode(errors='replace')}")
        return body

    def close(self) -> None:
        self.writer.close()


@contextmanager
def kiln_serve(repository: Path, model: str, log: Path, flags: list[str],
               timeout: float = 120) -> Iterator[tuple[subprocess.Popen, int, int]]:
    """`kiln serve` on loopback for the digits model in `repository`, once it is AVAILABLE; yields
    the process and its REST and gRPC ports. Its output goes to `log`. One worker (the process
    yielded serves, for profilers) unless `flags` say --workers."""
    rest_port, grpc_port = free_ports(2)
    workers = [] if "--workers" in flags else ["--workers", "1"]
    command = [sys.executable, "-m", "runtime.cli", "serve", "--model-repository", str(repository),
               "--rest-port", str(rest_port), "--grpc-port", str(grpc_port), "--host", "127.0.0.1", *workers, *flags]
    with open(log, "wb") as output:
        server = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{rest_port}/v1/models/{model}", timeout=5) as r:
                    if b'"AVAILABLE"' in r.read():
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise ServerError(f"kiln serve did not serve {model} (exit status {server.poll()}):\n"
                                  f"{log.read_text(errors='replace')}")
            time.sleep(0.2)
        yield server, rest_port, grpc_port
    finally:
        server.terminate()
        server.wait(60)


def read_py_spy(raw: Path, waits, classify) -> tuple[Counter, Counter, int]:
    """Samples of a `py-spy record --format raw` file, less those whose innermost frame is one of
    `waits` (an idle thread that py-spy counts as active): counted by innermost frame, and by what
    classify(frames) names (frames outermost first, line numbers dropped); and how many samples
    were left out."""
    import re

    own, groups, waiting = Counter(), Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        if frames[-1] in waits:
            waiting += int(count)
        else:
            own[frames[-1]] += int(count)
            groups[classify(frames)] += int(count)
    return own, groups, waiting
