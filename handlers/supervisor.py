"""`kiln serve --workers N`: N worker processes serving the same ports, and the supervisor that keeps them.

One Python process has one event loop thread, which parses HTTP, decodes JSON and encodes answers for
every request while the engine idles; a Cloud Run instance has up to 8 vCPUs. So the server runs N
workers, each a whole `kiln serve` (its own event loop, repository and batcher) started afresh
(`python -m runtime.cli serve ...`, never forked: the repository's threads would not survive a fork).
They open the REST and gRPC ports with SO_REUSEPORT, and the kernel spreads new connections over
them, each worker with its own accept queue (even for persistent connections, unlike one inherited
socket that the idlest process drains); a worker that dies takes the connections in its queue with it
(unless net.ipv4.tcp_migrate_req=1). The libraries and weights of the servables are mapped from the
same files, so their pages are shared.

The supervisor holds both ports bound (with SO_REUSEPORT, not listening: it never takes a
connection), which reserves them, turns a port 0 into a real one before any worker starts, and fails
at once if another server holds one. It restarts a worker that dies (logged, counted in
`kiln_worker_restarts_total`; quick deaths back off up to 30 s), except one of the first workers that
fails within 30 s of its start with a status (a model that cannot load): then it stops them all and
exits with that status, as one process would. On SIGTERM or SIGINT it passes
SIGTERM to every worker, each finishes its in-flight requests within the grace period, and workers
still running after it are killed. Workers die with it (PR_SET_PDEATHSIG) if it is killed.

Metrics: the supervisor gives the workers a fresh PROMETHEUS_MULTIPROC_DIR, which runtime.metrics
sums over (prometheus-client's multiprocess mode); a dead worker's live gauges are removed
(mark_process_dead) and the directory is deleted at exit.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
WORKER_ENV = "KILN_WORKER"  # set in each worker to its index: a process with it serves, never supervises
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
GRACE_SECONDS = 30  # how long in-flight requests may take to finish at shutdown, REST and gRPC
STOP_MARGIN_SECONDS = 5.0  # beyond the workers' own grace period, before they are killed
QUICK_DEATH_SECONDS = 30.0  # a worker that dies sooner counts towards the restart backoff
MAX_BACKOFF_SECONDS = 30.0
_PR_SET_PDEATHSIG = 1


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity; on Cloud Run it follows --cpu)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen
    started: float
    quick_deaths: int = 0
    first: bool = True  # of the workers started with the server, not a replacement


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to host:port with SO_REUSEPORT and not listening: it holds the port (a real one
    for port 0) for workers that bind the same way, and takes no connections itself."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


class Supervisor:
    """Starts `workers` copies of `command` (a `kiln serve` command line), keeps them running and
    stops them; run() returns the exit status."""

    def __init__(self, command: list[str], workers: int, grace_seconds: float | None = None):
        self.command = command
        self.count = workers
        self.grace_seconds = grace_seconds
        self.workers: dict[int, _Worker] = {}
        self._stopping = False
        self._status = 0
        self._restarts: Any = None  # a prometheus_client Counter, made once the multiprocess mode is chosen

    def run(self) -> int:
        directory = tempfile.mkdtemp(prefix="kiln-metrics-")
        os.environ[MULTIPROC_ENV] = directory  # before prometheus_client is imported here or in a worker
        if "prometheus_client" in sys.modules:
            raise RuntimeError("prometheus_client was imported before the supervisor chose its multiprocess mode")
        from prometheus_client import Counter

        if self.grace_seconds is None:
            self.grace_seconds = GRACE_SECONDS

        self._restarts = Counter("kiln_worker_restarts", "Workers of kiln serve restarted after they died")
        previous = {signum: signal.signal(signum, self._stop) for signum in (signal.SIGTERM, signal.SIGINT)}
        try:
            for index in range(self.count):
                self.workers[index] = self._start(index)
            log.info(
                "kiln serve: %d workers started (pids %s)",
                self.count,
                ", ".join(str(w.process.pid) for w in self.workers.values()),
            )
            while not self._stopping:
                self._reap()
                time.sleep(0.2)
            self._drain()
            return self._status
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            shutil.rmtree(directory, ignore_errors=True)

    def _start(self, index: int, quick_deaths: int = 0) -> _Worker:
        here = str(Path(__file__).resolve().parents[1])  # the workers import this very copy of Kiln
        path = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
        process = subprocess.Popen(
            self.command,
            env={**os.environ, WORKER_ENV: str(index), "PYTHONPATH": path},
            preexec_fn=_die_with_parent,
            process_group=0,
        )  # Ctrl-C reaches us alone
        return _Worker(index, process, time.monotonic(), quick_deaths, first=index not in self.workers)

    def _reap(self) -> None:
        """Replace every worker that has exited."""
        from prometheus_client import multiprocess

        for index, worker in list(self.workers.items()):
            status = worker.process.poll()
            if status is None or self._stopping:
                continue
            multiprocess.mark_process_dead(worker.process.pid)
            quick = worker.quick_deaths + 1 if time.monotonic() - worker.started < QUICK_DEATH_SECONDS else 0
            if worker.first and quick and status > 0:  # it failed to start (its log says why): so would others
                log.error(
                    "kiln serve: worker %d (pid %d) failed to start (status %d); stopping",
                    index,
                    worker.process.pid,
                    status,
                )
                self._status, self._stopping = status, True
                return
            delay = min(MAX_BACKOFF_SECONDS, 0.5 * 2 ** (quick - 1)) if quick else 0.0
            log.warning(
                "kiln serve: worker %d (pid %d) exited with status %s; restarting it%s",
                index,
                worker.process.pid,
                status,
                f" in {delay:g} s" if delay else "",
            )
            self._restarts.inc()
            if delay:
                self._sleep(delay)
                if self._stopping:
                    del self.workers[index]
                    return
            self.workers[index] = self._start(index, quick)

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            time.sleep(0.1)

    def _stop(self, signum: int, frame) -> None:
        self._stopping = True

    def _drain(self) -> None:
        """SIGTERM to every worker; those not gone after the grace period are killed."""
        for worker in self.workers.values():
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + (self.grace_seconds or 0) + STOP_MARGIN_SECONDS
        for worker in self.workers.values():
            try:
                worker.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning(
                    "kiln serve: worker %d (pid %d) did not stop within the grace period; killed",
                    worker.index,
                    worker.process.pid,
                )
                worker.process.kill()
                worker.process.wait()
        log.info("kiln serve: every worker stopped")


def prepare_forked_workers(environ=os.environ) -> int:
    """For a server whose own master forks the workers (functions-framework's gunicorn on Cloud Run,
    WORKERS): WORKERS from KILN_WORKERS, else the CPUs, unless it is set; with more than one, a fresh
    PROMETHEUS_MULTIPROC_DIR. Call it before prometheus_client is imported; returns the workers."""
    if not environ.get("WORKERS"):
        kiln = environ.get("KILN_WORKERS", "").strip()
        environ["WORKERS"] = kiln if kiln.isdigit() and int(kiln) > 0 else str(available_cpus())
    try:
        workers = int(environ["WORKERS"])
    except ValueError:
        return 1  # gunicorn refuses it with its own message
    if workers > 1 and not environ.get(MULTIPROC_ENV):
        import atexit

        environ[MULTIPROC_ENV] = directory = tempfile.mkdtemp(prefix="kiln-metrics-")
        master = os.getpid()  # the workers it forks run atexit handlers too: only the master removes it

        def remove() -> None:
            if os.getpid() == master:
                shutil.rmtree(directory, ignore_errors=True)

        atexit.register(remove)
    return workers


def forget_dead_workers(directory: str) -> None:
    """mark_process_dead for every pid with values in `directory` that no longer runs: what a master
    that cannot call it when a worker dies (gunicorn under functions-framework) has each new worker do."""
    import re

    from prometheus_client import multiprocess

    for pid in {int(m.group(1)) for name in os.listdir(directory) if (m := re.search(r"_(\d+)\.db$", name))}:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, directory)
        except PermissionError:
            pass


def _die_with_parent() -> None:
    """In a worker, before it runs: SIGTERM when the supervisor dies, so no worker outlives it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:  # the supervisor died before prctl took effect
        os._exit(1)


def supervise(argv: list[str], workers: int, host: str, rest_port: int, grpc_port: int | None) -> int:
    """Reserve the ports, then run `workers` workers of `kiln serve` with argv (its arguments) and the
    ports the reservation resolved; returns the exit status."""
    held = [reserve_port(host, rest_port)]
    rest_port = held[0].getsockname()[1]
    if grpc_port:
        held.append(reserve_port(host, grpc_port))
        grpc_port = held[1].getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "runtime.cli",
        *argv,
        "--rest-port",
        str(rest_port),
        "--grpc-port",
        str(grpc_port or 0),
    ]
    try:
        return Supervisor(command, workers).run()
    finally:
        for sock in held:
            sock.close()
