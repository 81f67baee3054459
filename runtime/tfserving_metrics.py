"""TensorFlow Serving's metrics under its own names and labels, beside kiln_*, so that dashboards and
alerts written for TF Serving keep working.

TF Serving's exporter (tensorflow_serving/util/prometheus_exporter.cc) turns a metric path into a name
by replacing each character outside [a-zA-Z0-9_] with ':', writes counters without a _total suffix,
and samplers as histograms in microseconds. What Kiln records (names, labels and buckets as in
tensorflow_serving/servables/tensorflow/util.cc and tensorflow/core/framework/metrics.cc):

    :tensorflow:serving:request_count{model_name, status}          requests, status a gRPC code name
    :tensorflow:serving:request_latency{model_name, API, entrypoint}   request to response (µs)
    :tensorflow:serving:runtime_latency{model_name, API, runtime}      the model work of one request
                                                                       (µs), batching's queue included
                                                                       as in TF Serving's BatchingSession
    :tensorflow:core:graph_runs, :tensorflow:core:graph_run_time_usecs, and
    :tensorflow:core:graph_run_time_usecs_histogram                 executions of compiled code

API is TF Serving's method name (Predict, Classify, Regress, MultiInference; the Open Inference
Protocol's infer counts as Predict), entrypoint REST or GRPC (else the protocol's name), runtime the
engine (xla-aot, saved-model) where TF Serving writes TF1 or TFRT. Only model work is counted, as
TF Serving does. Counters are written as `untyped`: prometheus_client names a counter's TYPE line
NAME_total, which would no longer match its samples' TF Serving names.
"""

from __future__ import annotations

import threading
from collections import defaultdict

from prometheus_client.metrics_core import Metric

API_NAMES = {"predict": "Predict", "classify": "Classify", "regress": "Regress",
             "multi_inference": "MultiInference", "infer": "Predict"}
ENTRYPOINTS = {"rest": "REST", "grpc": "GRPC"}
HTTP_CODES = {200: "OK", 400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
              404: "NOT_FOUND", 408: "DEADLINE_EXCEEDED", 409: "ABORTED", 412: "FAILED_PRECONDITION",
              413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 501: "UNIMPLEMENTED", 503: "UNAVAILABLE",
              504: "DEADLINE_EXCEEDED"}


def exponential(scale: float, growth: float, count: int) -> tuple[float, ...]:
    """TensorFlow's monitoring::Buckets::Exponential: count limits from scale, then +Inf."""
    return tuple(scale * growth ** i for i in range(count))


LATENCY_BUCKETS = exponential(10, 1.8, 33)  # request_latency, runtime_latency
GRAPH_RUN_BUCKETS = exponential(1000, 2, 20)  # graph_run_time_usecs_histogram


class _Histogram:
    def __init__(self, bounds: tuple[float, ...]):
        self.bounds, self.counts, self.sum = bounds, [0] * (len(bounds) + 1), 0.0

    def observe(self, value: float) -> None:
        self.counts[next((i for i, bound in enumerate(self.bounds) if value <= bound), len(self.bounds))] += 1
        self.sum += value


class TfServingMetrics:
    """The counts, and a prometheus_client collector writing them (register it on a registry)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str], int] = defaultdict(int)
        self._request_latency: dict[tuple[str, str, str], _Histogram] = {}
        self._runtime_latency: dict[tuple[str, str, str], _Histogram] = {}
        self._graph = _Histogram(GRAPH_RUN_BUCKETS)

    def request(self, protocol: str, api: str, model: str, status: str, seconds: float) -> None:
        """A request answered; `status` a gRPC code name or an HTTP status."""
        if api not in API_NAMES or not model:
            return
        code = HTTP_CODES.get(int(status), "INTERNAL" if int(status) >= 500 else "INVALID_ARGUMENT") \
            if status.isdigit() else status
        entrypoint = ENTRYPOINTS.get(protocol, protocol.upper())
        with self._lock:
            self._requests[model, code] += 1
            self._histogram(self._request_latency, (model, API_NAMES[api], entrypoint), LATENCY_BUCKETS) \
                .observe(seconds * 1e6)

    def runtime(self, model: str, api: str, engine: str, seconds: float) -> None:
        """One request's model work done."""
        with self._lock:
            self._histogram(self._runtime_latency, (model, API_NAMES.get(api, "Predict"), engine),
                            LATENCY_BUCKETS).observe(seconds * 1e6)

    def graph_run(self, seconds: float) -> None:
        """One execution of compiled code (a batch)."""
        with self._lock:
            self._graph.observe(seconds * 1e6)

    @staticmethod
    def _histogram(table: dict, labels: tuple, bounds: tuple[float, ...]) -> _Histogram:
        if labels not in table:
            table[labels] = _Histogram(bounds)
        return table[labels]

    def collect(self):
        with self._lock:
            requests = _untyped(":tensorflow:serving:request_count", "The total number of requests.")
            for (model, status), count in sorted(self._requests.items()):
                requests.add_sample(requests.name, {"model_name": model, "status": status}, count)
            yield requests
            yield _histograms(":tensorflow:serving:request_latency", "Distribution of wall time (in microseconds) "
                              "for Tensorflow Serving request.", ("model_name", "API", "entrypoint"),
                              self._request_latency)
            yield _histograms(":tensorflow:serving:runtime_latency", "Distribution of wall time (in microseconds) "
                              "for Tensorflow runtime.", ("model_name", "API", "runtime"), self._runtime_latency)
            runs = sum(self._graph.counts)
            graph_runs = _untyped(":tensorflow:core:graph_runs", "The number of graph executions used to collect "
                                  "/tensorflow/core/graph_run_time_usecs")
            graph_runs.add_sample(graph_runs.name, {}, runs)
            graph_time = _untyped(":tensorflow:core:graph_run_time_usecs",
                                  "The total time spent on executing graphs in microseconds.")
            graph_time.add_sample(graph_time.name, {}, int(self._graph.sum))
            yield graph_runs
            yield graph_time
            yield _histograms(":tensorflow:core:graph_run_time_usecs_histogram", "The wall-clock time spent on "
                              "executing graphs in microseconds.", (), {(): self._graph} if runs else {})


def _untyped(name: str, documentation: str) -> Metric:
    return Metric(name, documentation, "untyped")


def _histograms(name: str, documentation: str, label_names: tuple[str, ...], table: dict) -> Metric:
    metric = Metric(name, documentation, "histogram")
    for values, histogram in sorted(table.items()):
        labels = dict(zip(label_names, values))
        cumulative = 0
        for bound, count in zip([*histogram.bounds, float("inf")], histogram.counts):
            cumulative += count
            metric.add_sample(f"{name}_bucket", {**labels, "le": _bound(bound)}, cumulative)
        metric.add_sample(f"{name}_sum", labels, histogram.sum)
        metric.add_sample(f"{name}_count", labels, cumulative)
    return metric


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else f"{value:g}"
