"""`kiln serve --workers 2` (handlers.supervisor) as a real process tree: both workers answer on the
shared ports, metrics sum over them, a session moves between them, a killed worker loses only its own
in-flight requests and is replaced, SIGTERM answers what every worker has in flight, and a hot swap
from an S3-compatible store under load, both workers downloading into one cache, fails nothing.

Which worker answered: the X-Kiln-Worker header (its pid). A fresh connection per request lets the
kernel's SO_REUSEPORT spread requests over the workers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from tests.conftest import ROOT, free_port, stop, wait_until_up

pytest_plugins = ["tests.redis_server"]
KEY = "11" * 32
IMAGE = np.linspace(0, 1, 28 * 28, dtype=np.float32).reshape(28, 28, 1).tolist()
PREDICT = orjson.dumps({"instances": [IMAGE]})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from examples.build import build_examples

    return build_examples(tmp_path_factory.mktemp("examples"), ["digits", "tiny_lm"], log=lambda message: None)


@contextmanager
def serve_workers(repository: str, log_dir: Path, *args: str, env: dict | None = None):
    """`kiln serve --workers 2` over `repository`; yields (supervisor process, REST URL, gRPC port) once
    both workers have answered."""
    rest, grpc_port = free_port(), free_port()
    log_path = log_dir / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve", "--model-repository", repository,
                                    "--rest-port", str(rest), "--grpc-port", str(grpc_port), "--host", "127.0.0.1",
                                    "--workers", "2", *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{rest}"
    seen: set[int] = set()
    wait_until_up(process, lambda: len(seen | answering(url, tries=4, into=seen)) >= 2, log_path, "kiln serve")
    try:
        yield process, url, grpc_port
    finally:
        stop(process, grace=40)


def answering(url: str, tries: int = 40, into: set[int] | None = None) -> set[int]:
    """The workers that answer status requests, each on a fresh connection."""
    seen = set() if into is None else into
    for _ in range(tries):
        response = httpx.get(f"{url}/v1/models/digits", timeout=10)
        if response.status_code == 200:
            seen.add(worker_of(response))
    return seen


def worker_of(response: httpx.Response) -> int:
    return int(response.headers["x-kiln-worker"])


def children(process: subprocess.Popen) -> set[int]:
    import psutil

    return {child.pid for child in psutil.Process(process.pid).children()}


def requests_total(url: str, **labels: str) -> float:
    """kiln_requests_total summed over the samples with these labels."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/monitoring/prometheus/metrics", timeout=10).text
    return sum(sample.value for family in text_string_to_metric_families(text) if family.name == "kiln_requests"
               for sample in family.samples if sample.name == "kiln_requests_total"
               and all(sample.labels.get(k) == v for k, v in labels.items()))


def metric(url: str, name: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = [sample.value for family in text_string_to_metric_families(text) for sample in family.samples
              if sample.name == name]
    return sum(values) if values else None


class Load:
    """Clients, each on its own keep-alive connection, predicting in a loop; every answer or failure is
    recorded with the worker that last answered on that client's connection. Client n first reconnects
    until its connection is held by workers[n % len(workers)], so every worker holds some (the kernel's
    SO_REUSEPORT hash alone put all six on one worker in about 3% of runs). A client stops at its
    first failure: a new connection made at once could land in the accept queue of a worker that is
    dying, which the kernel resets (README, "Workers": net.ipv4.tcp_migrate_req)."""

    def __init__(self, url: str, workers: set[int], clients: int = 6):
        self.url, self.stop, self.workers = url, threading.Event(), sorted(workers)
        self.answers: list[tuple[int, int]] = []  # (client, worker pid)
        self.failures: list[tuple[int, int | None, str]] = []  # (client, worker of its connection, error)
        self.threads = [threading.Thread(target=self._run, args=(n,)) for n in range(clients)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()

    def wait(self, settled, what: str, seconds: float = 120) -> None:
        """Until settled() holds; fails, naming what was awaited, on a client's failure or after `seconds`."""
        deadline = time.monotonic() + seconds
        while not settled():
            assert not self.failures, f"{what}: {self.failures}"
            assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
            time.sleep(0.05)

    def _run(self, n: int) -> None:
        last = None
        try:
            client = self._connect(self.workers[n % len(self.workers)])
        except Exception as e:  # noqa: BLE001 - recorded, so that a wait fails at once
            self.failures.append((n, None, repr(e)))
            return
        try:
            while not self.stop.is_set():
                try:
                    response = client.post(f"{self.url}/v1/models/digits:predict", content=PREDICT)
                    assert response.status_code == 200, response.text
                    last = worker_of(response)
                    self.answers.append((n, last))
                except Exception as e:  # noqa: BLE001 - what failed, and on which worker, is what the tests check
                    self.failures.append((n, last, repr(e)))
                    return
        finally:
            client.close()

    def _connect(self, worker: int) -> httpx.Client:
        """A client whose keep-alive connection `worker` holds (each fresh connection lands at random)."""
        for _ in range(100):
            client = httpx.Client(timeout=30)
            if worker_of(client.get(f"{self.url}/v1/models/digits")) == worker:
                return client
            client.close()
        raise AssertionError(f"no connection reached worker {worker} in 100 tries")


@pytest.fixture(scope="module")
def served(models, tmp_path_factory, redis_server):
    """One server for the tests that do not stop it: digits and tiny_lm, sessions in Redis."""
    root = tmp_path_factory.mktemp("workers")
    for name in ("digits", "tiny_lm"):
        shutil.copytree(models[name].servable, root / "models" / name / "1")
    with serve_workers(str(root / "models"), root, env={"KILN_REDIS_URL": redis_server.url,
                                                        "KILN_SESSION_KEY": KEY}) as running:
        yield running


def test_workers_share_the_ports_and_all_answer(served):
    process, url, grpc_port = served
    import tritonclient.grpc as triton

    workers = answering(url)
    assert len(workers) == 2 and workers == children(process)
    for _ in range(6):  # gRPC on the same port: every fresh channel is answered
        client = triton.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert client.is_model_ready("digits")
        client.close()


def test_metrics_sum_over_workers(served):
    _, url, _ = served
    before = requests_total(url, model="digits", api="predict", status="200")
    tf_serving_before = metric(url, ":tensorflow:serving:request_count") or 0  # TF Serving's names sum too
    by_worker: dict[int, int] = {}
    for _ in range(30):
        response = httpx.post(f"{url}/v1/models/digits:predict", content=PREDICT, timeout=30)
        assert response.status_code == 200
        by_worker[worker_of(response)] = by_worker.get(worker_of(response), 0) + 1
    assert len(by_worker) == 2, "both workers answered some"
    assert requests_total(url, model="digits", api="predict", status="200") - before == 30
    assert metric(url, ":tensorflow:serving:request_count") - tf_serving_before == 30
    assert metric(url, "kiln_worker_restarts_total") == 0


def test_a_session_started_on_one_worker_continues_on_another(served):
    """The continuation, on the other worker, generates what one uninterrupted run over the whole
    history generates."""
    _, url, _ = served
    generate = f"{url}/v1/models/tiny_lm:generate"
    first = httpx.post(generate, json={"prompt": "Kiln fires ", "max_tokens": 6}, timeout=60)
    assert first.status_code == 200, first.text
    other = None
    for _ in range(50):  # a keep-alive connection that the other worker holds
        client = httpx.Client(timeout=60)
        if worker_of(client.get(f"{url}/v1/models/tiny_lm")) != worker_of(first):
            other = client
            break
        client.close()
    assert other is not None, "no connection reached the other worker"
    try:
        second = other.post(generate, json={"prompt": "the clay", "max_tokens": 6, "session": first.json()["session"]})
    finally:
        other.close()
    assert second.status_code == 200, second.text
    assert worker_of(second) != worker_of(first) and second.json()["session"] == first.json()["session"]
    whole = list(b"Kiln fires ") + first.json()["tokens"] + list(b"the clay")
    uninterrupted = httpx.post(generate, json={"tokens": whole, "max_tokens": 6}, timeout=60)
    assert uninterrupted.json()["tokens"] == second.json()["tokens"]


def test_a_killed_worker_loses_only_its_in_flight_requests_and_is_replaced(served):
    process, url, _ = served
    victim = min(children(process))
    with Load(url, children(process)) as load:
        load.wait(lambda: len({n for n, _ in load.answers}) == len(load.threads), "every client answered")
        assert {pid for _, pid in load.answers} == children(process)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while victim in children(process) or len(children(process)) < 2:
            assert time.monotonic() < deadline, "the worker was not replaced"
            time.sleep(0.1)
        time.sleep(0.5)
    on_victim = {client for client, pid in load.answers if pid == victim}
    assert all(pid == victim for _, pid, _ in load.failures), load.failures
    assert len(load.failures) <= len(on_victim), "at most one request per connection the victim held"
    survivors = children(process)
    assert victim not in survivors and len(survivors) == 2
    deadline = time.monotonic() + 120
    while answering(url, tries=10) != survivors:  # the replacement answers once its models are loaded
        assert time.monotonic() < deadline, "the replacement never answered"
    assert metric(url, "kiln_worker_restarts_total") == 1


def test_sigterm_answers_the_requests_in_flight_on_every_worker(models, tmp_path):
    """Each request has sent its headers and half its body when the server is told to stop; the rest
    comes after, and every one is answered 200 by the worker that holds it."""
    shutil.copytree(models["digits"].servable, tmp_path / "models" / "digits" / "1")
    with serve_workers(str(tmp_path / "models"), tmp_path) as (process, url, _):
        port = int(url.rpartition(":")[2])
        held: dict[int, list[socket.socket]] = {}
        while min((len(v) for v in held.values()), default=0) < 2 or len(held) < 2:
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /v1/models/digits HTTP/1.1\r\nhost: x\r\n\r\n")
            pid = int(_read_answer(sock)[1]["x-kiln-worker"])
            sock.sendall(b"POST /v1/models/digits:predict HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n"
                         % len(PREDICT) + PREDICT[:len(PREDICT) // 2])
            held.setdefault(pid, []).append(sock)
        process.send_signal(signal.SIGTERM)
        time.sleep(1)  # every worker has the signal and has stopped accepting
        for sockets in held.values():
            for sock in sockets:
                sock.sendall(PREDICT[len(PREDICT) // 2:])
        for pid, sockets in held.items():
            for sock in sockets:
                status, headers, body = _read_answer(sock)
                assert status == 200 and int(headers["x-kiln-worker"]) == pid, body
                assert len(orjson.loads(body)["predictions"][0]) == 10
                sock.close()
        assert process.wait(60) == 0


def _read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def test_hot_swap_from_s3_under_load_with_two_workers_fails_no_request(models, bucket, tmp_path):
    """Version 2 is published to the store and version 1 removed while clients predict: both workers
    download version 2 into one servable cache at once, swap, and no request fails."""
    client, name = bucket
    servable = models["digits"].servable

    def publish(version: int) -> None:
        files = sorted(p for p in servable.rglob("*") if p.is_file())
        for path in sorted(files, key=lambda p: p.name == "manifest.json"):  # the manifest last
            client.upload_file(str(path), name, f"models/digits/{version}/{path.relative_to(servable)}")

    publish(1)
    cache = tmp_path / "cache"
    with serve_workers(f"s3://{name}/models", tmp_path, "--poll-seconds", "0.5",
                       env={"KILN_SERVABLE_CACHE": str(cache)}) as (process, url, _):
        with Load(url, children(process)) as load:
            load.wait(lambda: len(load.answers) >= 20, "20 answers before the publish")
            publish(2)
            deadline = time.monotonic() + 120
            while not all(_serves_only(url, 2, pid) for pid in children(process)):
                assert time.monotonic() < deadline, "the workers did not swap to version 2"
                time.sleep(0.2)
            seen = len(load.answers)
            load.wait(lambda: len(load.answers) >= seen + 20, "20 answers after the swap")
        assert load.failures == []
        assert {pid for _, pid in load.answers} == children(process)
    placed = [p for p in cache.glob("*/digits/*")]
    assert sorted(p.name for p in placed) == ["1", "2"], "complete versions only, no staging left behind"
    from runtime.manifest import read_manifest, verify_files

    for directory in placed:
        verify_files(directory, read_manifest(directory))


def _serves_only(url: str, version: int, pid: int) -> bool:
    """Whether worker pid reports `version` as its only AVAILABLE version of digits (asked on fresh
    connections until that worker answers)."""
    for _ in range(40):
        response = httpx.get(f"{url}/v1/models/digits", timeout=10)
        if worker_of(response) == pid:
            available = [v["version"] for v in response.json()["model_version_status"] if v["state"] == "AVAILABLE"]
            return available == [str(version)]
    return False


def test_workers_that_cannot_start_stop_the_server_with_their_status(tmp_path):
    """A repository without models: each worker fails to start, and the supervisor exits with its
    status and their reason in the log, instead of restarting them for ever."""
    empty = tmp_path / "models"
    empty.mkdir()
    result = subprocess.run([sys.executable, "-m", "runtime.cli", "serve", "--model-repository", str(empty),
                             "--rest-port", str(free_port()), "--grpc-port", "0", "--host", "127.0.0.1",
                             "--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "no models in" in result.stderr and "failed to start" in result.stderr
