"""Prometheus metrics: what the server answered, how long it took, how work was batched, and how
its models loaded.

Each App has its own registry (several apps in one process, as in tests, do not mix their counts).
Model states and load and warm-up times are read from the repository when scraped, so they are
never stale and the repository does not know about metrics. Served at /monitoring/prometheus/metrics
(TensorFlow Serving's path) and /metrics.

With several workers (handlers.supervisor sets PROMETHEUS_MULTIPROC_DIR before any of them starts)
every value is kept in that directory by prometheus-client's multiprocess mode and a scrape, whichever
worker answers it, reports the sum over the workers, dead ones' counters included: the queue depth is
the live workers' sum, the cold start the latest worker's. The process_* metrics are then left out
(one process's, or a sum of them, would mislead); model states are the answering worker's, which
are every worker's once a change has reached them all.
"""

from __future__ import annotations

import os
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from runtime.errors import KilnError
from runtime.tfserving_metrics import TfServingMetrics

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONTENT_TYPE = CONTENT_TYPE_LATEST
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's: where every worker's values live


class Metrics:
    def __init__(self, repository=None):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kiln_requests",
            "Requests answered, by model, version, API, protocol and status",
            ["model", "version", "api", "protocol", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "kiln_request_duration_seconds",
            "Time from request to response",
            ["model", "api", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "kiln_batch_size",
            "Rows per execution of a signature (before padding to a bucket)",
            ["model", "version", "signature"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.execution = Histogram(
            "kiln_execution_seconds",
            "Time the compiled code ran for one execution",
            ["model", "version", "signature"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "kiln_queue_depth",
            "Requests waiting for or in model execution",
            ["model"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.cold_start = Gauge(
            "kiln_cold_start_seconds",
            "From process start to every configured model loaded and warmed up",
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.shared = os.environ.get(MULTIPROC_ENV)
        if self.shared:  # what a scrape reports: the workers' sum, and this worker's view of its models
            self.scraped = CollectorRegistry()
            from prometheus_client.multiprocess import MultiProcessCollector

            MultiProcessCollector(self.scraped, self.shared)
        else:
            ProcessCollector(registry=self.registry)
            self.scraped = self.registry
        self.tfserving = TfServingMetrics(self.registry)  # TF Serving's names beside kiln_*
        if repository is not None:
            self.scraped.register(_RepositoryCollector(repository))

    def request(self, protocol: str, api: str, model: str, version: str, status: str, seconds: float) -> None:
        self.requests.labels(model, version, api, protocol, status).inc()
        self.latency.labels(model, api, protocol).observe(seconds)
        self.tfserving.request(protocol, api, model, status, seconds)

    def executed(self, labels: tuple[str, str, str], seconds: float) -> None:
        """One execution of a signature's compiled code (model, version, signature)."""
        self.execution.labels(*labels).observe(seconds)
        self.tfserving.graph_run(seconds)

    def started(self) -> None:
        """Record the cold start: the process's age now that its models are loaded."""
        self.cold_start.set(process_age())

    def render(self) -> bytes:
        return generate_latest(self.scraped)


class _RepositoryCollector:
    """Model version states, load and warm-up seconds, read from the repository at scrape time."""

    def __init__(self, repository):
        self.repository = repository

    def collect(self):
        state = GaugeMetricFamily(
            "kiln_model_version_state", "1 for each model version's current state", labels=["model", "version", "state"]
        )
        load = GaugeMetricFamily(
            "kiln_model_load_seconds", "Fetch, verification and opening of a version", labels=["model", "version"]
        )
        warmup = GaugeMetricFamily(
            "kiln_model_warmup_seconds", "Warm-up of every signature at every bucket", labels=["model", "version"]
        )
        for name in self.repository.names():
            try:
                versions = self.repository.status(name).versions
            except KilnError:  # a model with no versions yet has nothing to report
                continue
            for v in versions:
                labels = [name, str(v.version)]
                state.add_metric([*labels, v.state.name], 1)
                if v.load_seconds:
                    load.add_metric(labels, v.load_seconds)
                    warmup.add_metric(labels, v.warmup_seconds)
        return [state, load, warmup]


def process_age() -> float:
    """Seconds since this process started, from the kernel's record (Linux); since this module was
    imported elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rpartition(")")[2].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


_IMPORTED = time.monotonic()
