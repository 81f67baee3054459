"""What tracing costs the serving path: with no OTEL_* variables, the import time of runtime.tracing
(`python -X importtime`, bytecode cached, the serve path's modules) and whether anything of
OpenTelemetry is imported; a request's trace start and end with spans off (no trace header, and a
caller's traceparent kept for the log lines); and with an OTLP endpoint set, what start-up pays to
import the SDK and exporter.

    python load/tracing_cost.py [--runs 15]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import timeit
import types
from pathlib import Path

from common import ROOT, write_results

SERVE_PATH = "import handlers.local, handlers.grpc.server, runtime.app"


def _python(code: str, *flags: str, cache: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = cache  # bytecode cached, as an installed package has it
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=True)


def import_ms(cache: str) -> tuple[float, float]:
    """(runtime.tracing's own import time, the serve path's total), in ms."""
    err = _python(SERVE_PATH, "-X", "importtime", cache=cache).stderr
    rows = re.findall(r"import time:\s+(\d+) \|\s+(\d+) \|( +)(\S+)", err)
    own = next(int(self_us) for self_us, _, _, name in rows if name == "runtime.tracing")
    total = sum(int(cumulative) for _, cumulative, indent, _ in rows if len(indent) == 1)
    return own / 1e3, total / 1e3


def request_ns(headers: dict) -> float:
    from runtime import tracing

    tracing.configure({})
    exchange = types.SimpleNamespace(protocol="rest", api="predict", model="m", version="1", status="200")
    number = 100_000
    best = min(timeit.repeat(lambda: tracing.start(headers, "POST /v1/models/m:predict").end(exchange),
                             number=number, repeat=5))
    return best / number * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--out", type=Path, default=ROOT / "load" / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kiln-pyc-") as cache:
        import_ms(cache)  # writes the bytecode
        imports = [import_ms(cache) for _ in range(args.runs)]
        otel_modules = _python(f"import sys; {SERVE_PATH}; from runtime import tracing; tracing.configure({{}}); "
                               "print(sum(m.startswith('opentelemetry') for m in sys.modules))", cache=cache).stdout
        configure = [float(_python(
            "import time, runtime.app; from runtime import tracing; t = time.perf_counter(); "
            "tracing.configure({'OTEL_EXPORTER_OTLP_ENDPOINT': 'http://127.0.0.1:4318'}); "
            "print((time.perf_counter() - t) * 1e3)", cache=cache).stdout) for _ in range(max(3, args.runs // 3))]
    plain = {"content-type": "application/json"}
    traced = {**plain, "traceparent": f"00-{'1' * 32}-{'2' * 16}-01"}
    tracing_ms = statistics.median(own for own, _ in imports)
    serve_ms = statistics.median(total for _, total in imports)
    write_results("tracing_cost", {
        "runs": args.runs,
        "runtime_tracing_import_ms": tracing_ms,
        "serve_path_import_ms": serve_ms,
        "tracing_share_of_serve_path_import": tracing_ms / serve_ms,
        "opentelemetry_modules_imported_without_otel_env": int(otel_modules),
        "request_ns_spans_off": {"no_trace_header": request_ns(plain), "traceparent": request_ns(traced)},
        "startup_ms_with_otlp_endpoint": statistics.median(configure),
    }, args.out)


if __name__ == "__main__":
    main()
