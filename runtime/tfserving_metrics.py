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
TF Serving does. Counts are prometheus-client gauges summed over processes (a Counter would
write NAME_total, no longer TF Serving's name), and histograms prometheus-client's: so with several
workers a scrape sums them like every kiln_* metric.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge, Histogram

API_NAMES = {
    "predict": "Predict",
    "classify": "Classify",
    "regress": "Regress",
    "multi_inference": "MultiInference",
    "infer": "Predict",
}
ENTRYPOINTS = {"rest": "REST", "grpc": "GRPC"}
HTTP_CODES = {
    200: "OK",
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    409: "ABORTED",
    412: "FAILED_PRECONDITION",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def exponential(scale: float, growth: float, count: int) -> tuple[float, ...]:
    """TensorFlow's monitoring::Buckets::Exponential: count limits from scale, then +Inf."""
    return tuple(scale * growth**i for i in range(count))


LATENCY_BUCKETS = exponential(10, 1.8, 33)  # request_latency, runtime_latency
GRAPH_RUN_BUCKETS = exponential(1000, 2, 20)  # graph_run_time_usecs_histogram


class TfServingMetrics:
    """TF Serving's metrics, registered on `registry`, and what records them."""

    def __init__(self, registry: CollectorRegistry):
        def count(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, documentation, labels, registry=registry, multiprocess_mode="sum")

        def histogram(name: str, documentation: str, labels: tuple[str, ...], buckets: tuple[float, ...]):
            return Histogram(name, documentation, labels, buckets=buckets, registry=registry)

        self._requests = count(
            ":tensorflow:serving:request_count", "The total number of requests.", ("model_name", "status")
        )
        self._request_latency = histogram(
            ":tensorflow:serving:request_latency",
            "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
            ("model_name", "API", "entrypoint"),
            LATENCY_BUCKETS,
        )
        self._runtime_latency = histogram(
            ":tensorflow:serving:runtime_latency",
            "Distribution of wall time (in microseconds) for Tensorflow runtime.",
            ("model_name", "API", "runtime"),
            LATENCY_BUCKETS,
        )
        self._graph_runs = count(
            ":tensorflow:core:graph_runs",
            "The number of graph executions used to collect /tensorflow/core/graph_run_time_usecs",
        )
        self._graph_time = count(
            ":tensorflow:core:graph_run_time_usecs", "The total time spent on executing graphs in microseconds."
        )
        self._graph_histogram = histogram(
            ":tensorflow:core:graph_run_time_usecs_histogram",
            "The wall-clock time spent on executing graphs in microseconds.",
            (),
            GRAPH_RUN_BUCKETS,
        )

    def request(self, protocol: str, api: str, model: str, status: str, seconds: float) -> None:
        """A request answered; `status` a gRPC code name or an HTTP status."""
        if api not in API_NAMES or not model:
            return
        code = (
            HTTP_CODES.get(int(status), "INTERNAL" if int(status) >= 500 else "INVALID_ARGUMENT")
            if status.isdigit()
            else status
        )
        self._requests.labels(model, code).inc()
        self._request_latency.labels(model, API_NAMES[api], ENTRYPOINTS.get(protocol, protocol.upper())).observe(
            seconds * 1e6
        )

    def runtime(self, model: str, api: str, engine: str, seconds: float) -> None:
        """One request's model work done."""
        self._runtime_latency.labels(model, API_NAMES.get(api, "Predict"), engine).observe(seconds * 1e6)

    def graph_run(self, seconds: float) -> None:
        """One execution of compiled code (a batch)."""
        self._graph_runs.inc()
        self._graph_time.inc(seconds * 1e6)
        self._graph_histogram.observe(seconds * 1e6)
