"""A real redis-server (Debian's package) on a free loopback port, for the session tests and the
session store benchmark: started in a temporary directory without persistence, waited for until it
answers PING, and stoppable, freezable and restartable on the same port in the middle of a test.

Test modules import the fixtures they use: `from tests.redis_server import redis_server`. Tests are
skipped, saying so, only where redis-server is not installed (`apt-get install redis-server`).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

BINARY = "redis-server"


class RedisServer:
    def __init__(self, directory: Path, port: int | None = None, binary: str = BINARY, options: Sequence[str] = ()):
        self.directory, self.binary, self.options = Path(directory), binary, list(options)
        self.port = port or _free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):
        """A plain synchronous redis-py client, for tests that reach under the store."""
        import redis

        return redis.Redis.from_url(self.url)

    def start(self, timeout: float = 20) -> RedisServer:
        log = (self.directory / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), *self.options], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.binary} did not start on port {self.port}: "
                                   f"{(self.directory / 'redis.log').read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # in case it was frozen
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        """Stop and start again on the same port: with no persistence, it comes back empty."""
        self.stop()
        self.start()

    def freeze(self) -> None:
        """SIGSTOP: connections are accepted by the kernel, nothing is answered (a hung server)."""
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class RedisCluster:
    """A Redis Cluster of `size` primaries (no replicas) on loopback, made as an operator makes one:
    redis-server with cluster-enabled on each port, then `redis-cli --cluster create`."""

    def __init__(self, directory: Path, size: int = 3):
        self.nodes = []
        for index in range(size):
            node_dir = Path(directory) / f"node{index}"
            node_dir.mkdir()
            self.nodes.append(RedisServer(node_dir, options=[
                "--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-port", str(_free_port())]))  # the bus: port + 10000 may not exist

    @property
    def url(self) -> str:
        """One node's address, as a cluster's configuration endpoint is given."""
        return self.nodes[0].url

    def __enter__(self) -> RedisCluster:
        for node in self.nodes:
            node.start()
        try:
            subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                            "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
            deadline = time.monotonic() + 30
            while not all(b"cluster_state:ok" in n.client().execute_command("CLUSTER", "INFO") for n in self.nodes):
                if time.monotonic() > deadline:
                    raise RuntimeError("the Redis cluster did not reach cluster_state:ok")
                time.sleep(0.1)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for node in self.nodes:
            node.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _require() -> None:
    if shutil.which(BINARY) is None:
        pytest.skip(f"{BINARY} is not installed (apt-get install redis-server); the session store tests "
                    f"need a real one")


@pytest.fixture(scope="session")
def redis_server():
    """One redis-server for the whole run; tests keep apart by using fresh session ids."""
    _require()
    with tempfile.TemporaryDirectory(prefix="kiln-redis-") as directory, RedisServer(Path(directory)) as server:
        yield server


@pytest.fixture(scope="module")
def redis_cluster():
    """A 3-primary Redis Cluster for a test module."""
    _require()
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not installed (apt-get install redis-tools); it makes the test cluster")
    with tempfile.TemporaryDirectory(prefix="kiln-redis-cluster-") as directory, RedisCluster(Path(directory)) as cluster:
        yield cluster


@pytest.fixture
def own_redis_server(tmp_path):
    """A redis-server of this test's own, which it may stop, freeze and restart."""
    _require()
    with RedisServer(tmp_path) as server:
        yield server

