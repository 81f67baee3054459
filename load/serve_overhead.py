"""Serve overhead: predictions per second of `kiln serve` at batch 1 against the same engine called
directly, on the digits example, as ratios server / engine for TensorFlow Serving's REST JSON
predict and its gRPC Predict, at 1, 2, 4 and 8 concurrent callers.

Why: at batch 1 the digits CNN runs in about 250 µs, so HTTP, gRPC, JSON, the event loop and the
thread pool can cost more than the model; this measures how much of the engine's rate a served
request keeps, and where the server's CPU goes.

How, for each concurrency C, closed loop (each caller sends its next request when its last is
answered), batch 1, for --seconds:
  engine  Engine.run in C threads of one process (runtime.engines.open_servable);
  rest    POST /v1/models/digits:predict, row format ({"instances": [...]}, what clients send),
          over C keep-alive HTTP/1.1 connections driven by a minimal asyncio client, so the load
          generator's own cost stays small next to the server's;
  grpc    PredictionService/Predict with the generated stubs, C calls in flight on one grpc.aio
          channel (a PredictRequest with packed tensor_content, as tf.make_tensor_proto writes).
The server is `python -m runtime.cli serve --batching off` with REST and gRPC on loopback, started
once: it runs each request alone, as the engine does here (batching_off() finds the flag in the
server's --help, and stops the run if it cannot). The load generator, and the direct engine, run in one process of their own
(neither shares the server's interpreter lock, nor the orchestrating process's). Rounds go
engine, REST, gRPC for every C in turn, and again; rates are medians of rounds, latencies (p50, p99)
are over every request of every round.

On a machine of few cores the load generator competes with the server for them: the CPU time of the
load generator's process (getrusage) and of the server (psutil) are reported per request, so the
reader can see how much of a gap is the client's. For the engine, the load generator's CPU is the
engine's own. Every response is checked for status (and the first one's values against the engine);
an error from the server is printed and stops the run.

Then, with py-spy installed (pip install py-spy) and --profile-seconds above 0, `py-spy record`
(100 Hz, --nonblocking: the server is not paused to be sampled) samples the server during one more
REST run and one more gRPC run at --profile-callers callers (not counted in the rates). The JSON gets, per protocol, the server's CPU per request split by layer
(engine, codec, HTTP, gRPC, logging, metrics, event loop, thread pool...) and the top frames by own
time, in percent of the working samples and in CPU µs per request (a share of psutil's CPU time);
the collapsed stacks go to load/results/serve_overhead_profile_{rest,grpc}.txt (speedscope.app
opens them). The server logs every request at INFO by default (its log goes to a temporary file;
lines above INFO are printed); --serve-args '--log-level WARNING' measures it without.

    python load/serve_overhead.py [--concurrency 1,2,4,8] [--rounds 5] [--seconds 1.5]
                                  [--profile-seconds 10] [--profile-callers 4] [--serve-args ARGS]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from common import (ROOT, HttpConnection, ServerError, example_servables, kiln_serve, pyplot, read_py_spy,
                    tfserving_requests, write_results)

MODEL, KEY = "digits", "serving_default"
MODES = ("engine", "rest", "grpc")
PREDICT_PATH = f"/v1/models/{MODEL}:predict"
TOP_FRAMES = 10


@dataclass
class Window:
    """One closed-loop run: requests answered, wall seconds, CPU seconds of the load generator's
    process and of the server, and every request's latency (seconds)."""

    requests: int
    seconds: float
    load_cpu_seconds: float
    server_cpu_seconds: float
    latencies: list[float]


class Meter:
    """Wall time and CPU time (this process's, the server's) from start() to stop()."""

    def __init__(self, server):
        self.server = server  # a psutil.Process

    def _now(self) -> tuple[float, float, float]:
        usage, server = resource.getrusage(resource.RUSAGE_SELF), self.server.cpu_times()
        return time.perf_counter(), usage.ru_utime + usage.ru_stime, server.user + server.system

    def start(self) -> None:
        self._start = self._now()

    def stop(self, latencies: list[list[float]]) -> Window:
        wall, load, server = (b - a for a, b in zip(self._start, self._now()))
        flat = [x for caller in latencies for x in caller]
        return Window(len(flat), wall, load, server, flat)


def threaded_loop(call: Callable[[], object], callers: int, seconds: float, meter: Meter) -> Window:
    """`callers` threads calling `call` back to back for `seconds`."""
    call()
    latencies: list[list[float]] = [[] for _ in range(callers)]
    ready = threading.Barrier(callers + 1)
    end = [0.0]

    def loop(out: list[float]) -> None:
        ready.wait()
        while (start := time.perf_counter()) < end[0]:
            call()
            out.append(time.perf_counter() - start)

    threads = [threading.Thread(target=loop, args=(out,)) for out in latencies]
    for thread in threads:
        thread.start()
    meter.start()
    end[0] = time.perf_counter() + seconds
    ready.wait()
    for thread in threads:
        thread.join()
    return meter.stop(latencies)


async def async_loop(calls: list[Callable[[], Awaitable]], seconds: float, meter: Meter) -> Window:
    """One coroutine per call, each awaiting its call back to back for `seconds`."""
    await asyncio.gather(*(call() for call in calls))  # connections up, first-call costs paid
    latencies: list[list[float]] = [[] for _ in calls]

    async def loop(call: Callable[[], Awaitable], out: list[float]) -> None:
        while (start := time.perf_counter()) < end:
            await call()
            out.append(time.perf_counter() - start)

    meter.start()
    end = time.perf_counter() + seconds
    await asyncio.gather(*(loop(call, out) for call, out in zip(calls, latencies)))
    return meter.stop(latencies)


class LoadGenerator:
    """Lives in its own process: the engine for direct calls, the request bodies, the clients."""

    def __init__(self, servable: str, server_pid: int, rest_port: int, grpc_port: int):
        import numpy as np
        import psutil

        from runtime.engines import open_servable
        from runtime.protos import generated_module

        self.engine = open_servable(servable)
        (spec,) = self.engine.signature(KEY).inputs
        self.inputs = {spec.name: np.random.default_rng(0).random((1, *spec.shape[1:]), dtype=np.float32)}
        (self.expected,) = self.engine.run(KEY, self.inputs).values()
        self.meter = Meter(psutil.Process(server_pid))
        self.rest_port, self.grpc_port = rest_port, grpc_port
        self.rest_body, self.grpc_request = tfserving_requests(MODEL, self.inputs, KEY)
        self.service = generated_module("tensorflow_serving.apis.prediction_service_pb2_grpc")

    def run(self, mode: str, callers: int, seconds: float) -> Window:
        if mode == "engine":
            return threaded_loop(lambda: self.engine.run(KEY, self.inputs), callers, seconds, self.meter)
        return asyncio.run((self._rest if mode == "rest" else self._grpc)(callers, seconds))

    async def _rest(self, callers: int, seconds: float) -> Window:
        import numpy as np
        import orjson

        connections = [await HttpConnection.open(self.rest_port, PREDICT_PATH, self.rest_body) for _ in range(callers)]
        try:
            answer = orjson.loads(await connections[0].post())
            np.testing.assert_allclose(answer["predictions"], self.expected, rtol=1e-5, atol=1e-6)
            return await async_loop([c.post for c in connections], seconds, self.meter)
        finally:
            for connection in connections:
                connection.close()

    async def _grpc(self, callers: int, seconds: float) -> Window:
        import grpc
        import numpy as np

        from runtime.codecs.tensor_proto import to_ndarray

        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.grpc_port}") as channel:
            stub = self.service.PredictionServiceStub(channel)

            async def predict():
                try:
                    return await stub.Predict(self.grpc_request, timeout=60)
                except grpc.aio.AioRpcError as e:
                    raise ServerError(f"gRPC Predict answered {e.code().name}: {e.details()}") from None

            (answer,) = (await predict()).outputs.values()
            np.testing.assert_allclose(to_ndarray(answer), self.expected, rtol=1e-5, atol=1e-6)
            return await async_loop([predict] * callers, seconds, self.meter)


def load_worker(connection, *args) -> None:
    """The load generator's process: answers each (mode, callers, seconds) with ("ok", Window), or
    ("error", message) and ends; None ends it."""
    try:
        generator = LoadGenerator(*args)
        connection.send(("ok", None))
        while (command := connection.recv()) is not None:
            connection.send(("ok", generator.run(*command)))
    except Exception as e:
        connection.send(("error", f"{type(e).__name__}: {e}"))


@contextmanager
def load_generator(*args) -> Iterator[Callable[[str, int, float], Window]]:
    """A load generator process; yields run(mode, callers, seconds) -> Window."""
    context = multiprocessing.get_context("spawn")  # no fork of a process that has threads
    ours, theirs = context.Pipe()
    process = context.Process(target=load_worker, args=(theirs, *args), daemon=True)
    process.start()

    def answer():
        status, value = ours.recv()
        if status != "ok":
            raise ServerError(value)
        return value

    def run(mode: str, callers: int, seconds: float) -> Window:
        ours.send((mode, callers, seconds))
        return answer()

    try:
        answer()
        yield run
    finally:
        try:
            ours.send(None)
        except OSError:  # it has ended already, after an error
            pass
        process.join(30)
        if process.is_alive():
            process.terminate()


def batching_off() -> list[str]:
    """The `kiln serve` flags that run every request alone (`--batching off`); none for a server
    without a batcher. A batching option this does not know stops the run rather than measure a
    batching server by mistake."""
    usage = subprocess.run([sys.executable, "-m", "runtime.cli", "serve", "--help"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout
    choices = re.search(r"--batching \{([^}]*)\}", usage)
    if choices is not None and "off" in choices[1].split(","):
        return ["--batching", "off"]
    if "batching" in usage:
        raise SystemExit(f"kiln serve has a batching option that load/serve_overhead.py cannot turn off:\n{usage}")
    return []


def summarize(windows: list[Window]) -> dict:
    import numpy as np

    latencies = np.array([x for w in windows for x in w.latencies])
    per_request = lambda key: statistics.median(getattr(w, key) / w.requests * 1e6 for w in windows)  # noqa: E731
    return {"requests_per_second": statistics.median(w.requests / w.seconds for w in windows),
            "p50_ms": float(np.percentile(latencies, 50) * 1e3), "p99_ms": float(np.percentile(latencies, 99) * 1e3),
            "load_generator_cpu_us_per_request": per_request("load_cpu_seconds"),
            "server_cpu_us_per_request": per_request("server_cpu_seconds"),
            "cores_busy": statistics.median((w.load_cpu_seconds + w.server_cpu_seconds) / w.seconds for w in windows),
            "requests": sum(w.requests for w in windows)}


# Where the server's Python threads spend their time, by the innermost frame of a known layer (a
# numpy or json frame counts for the code that called it). py-spy sees Python frames only: a leaf
# that is a thread's target or an event loop callback is native code, in kiln serve grpc's (its
# poller thread, grpc.aio's Cython callbacks); the engine's compiled code shows on its calling
# thread, not on its own pool threads. The interpreter's cyclic garbage collector shows on the frame
# that allocated when it ran. Samples whose leaf is a wait are left out (an idle pool thread, a
# condition, the event loop's select): py-spy counts some of them as active. "Active" time is a
# thread's time on a CPU or ready for one: on a busy machine it is more than its CPU time.
NATIVE = {"Thread.run (threading.py)": "grpc native (poller thread, aio callbacks)",
          "Handle._run (asyncio/events.py)": "grpc native (poller thread, aio callbacks)"}
LAYERS = (("engine (calling thread)", ("runtime/engines/", "runtime/buckets.py")),
          ("codec", ("runtime/codecs/",)),
          ("logging", ("logging/", "runtime/logs.py")),
          ("metrics", ("prometheus_client/", "runtime/metrics.py")),
          ("http (uvicorn, h11)", ("uvicorn/", "h11/")),
          ("grpc (Python side)", ("grpc/",)),
          ("kiln core (app, access, repository, handlers)",
           ("runtime/app.py", "runtime/access.py", "runtime/repository.py", "handlers/")),
          ("event loop", ("asyncio/", "selectors.py")),
          ("thread pool", ("concurrent/futures/", "threading.py", "queue.py")))
WAITS = ("_worker (concurrent/futures/thread.py)", "Condition.wait (threading.py)",
         "EpollSelector.select (selectors.py)")
SAMPLES_PER_SECOND = 100


def layer(frames: list[str]) -> str:
    if frames[-1] in NATIVE:
        return NATIVE[frames[-1]]
    for frame in reversed(frames):
        for name, places in LAYERS:
            if any(f"({place}" in frame for place in places):
                return name
    return "other"


def profile_server(pid: int, run: Callable[[str, int, float], Window], mode: str, seconds: float, callers: int,
                   raw: Path) -> dict:
    """py-spy's samples of the server during one more run: the top frames by own time, and the
    layers, in percent of the working samples and in CPU µs per request."""
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        print("py-spy is not installed (pip install py-spy): no profile", file=sys.stderr)
        return {"skipped": "py-spy is not installed"}
    recorder = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--duration", str(round(seconds)),
                                 "--rate", str(SAMPLES_PER_SECOND), "--nonblocking", "--format", "raw",
                                 "--output", str(raw)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1)  # attached
    window = run(mode, callers, seconds - 1)
    _, error = recorder.communicate()
    if recorder.returncode != 0:
        print(f"py-spy failed: {error}", file=sys.stderr)
        return {"skipped": f"py-spy failed: {error.strip()}"}
    own, layers, waiting = read_py_spy(raw, WAITS, layer)
    working = sum(own.values())
    per_request = 1e6 / SAMPLES_PER_SECOND / window.requests  # a sample stands for 1/rate s of a thread

    def shares(counter: Counter, key: str, most: int | None = None) -> list[dict]:
        return [{key: name, "percent": 100 * n / working, "active_us_per_request": n * per_request}
                for name, n in counter.most_common(most)]

    return {"mode": mode, "callers": callers, "requests_per_second": window.requests / window.seconds,
            "server_cpu_us_per_request": window.server_cpu_seconds / window.requests * 1e6,
            "active_us_per_request": working * per_request, "samples": working + waiting,
            "waiting_samples_left_out_percent": 100 * waiting / (working + waiting), "raw": str(raw),
            "layers": shares(layers, "layer"), "own": shares(own, "frame", TOP_FRAMES)}


def server_problems(log: Path) -> list[str]:
    """The server's log lines above INFO, and any that are not JSON (a traceback's)."""
    import orjson

    problems = []
    for line in log.read_bytes().splitlines():
        try:
            severity = orjson.loads(line).get("severity")
        except (orjson.JSONDecodeError, AttributeError):
            severity = None
        if severity not in ("DEBUG", "INFO"):
            problems.append(line.decode(errors="replace"))
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,2,4,8", help="concurrent callers to sweep")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.5, help="per round, mode and concurrency")
    parser.add_argument("--profile-seconds", type=float, default=10,
                        help="py-spy the server this long per protocol (0: no profile)")
    parser.add_argument("--profile-callers", type=int, default=4)
    parser.add_argument("--serve-args", default="", help="more `kiln serve` flags, e.g. '--log-level WARNING'")
    parser.add_argument("--out", type=Path, default=ROOT / "load" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="kiln-serve-overhead-"))
    example = example_servables(work / "models", [MODEL])[MODEL]  # installed as models/digits/1
    log = work / "serve.log"
    flags = [*batching_off(), *shlex.split(args.serve_args)]
    windows: dict[tuple[str, int], list[Window]] = {(mode, c): [] for c in concurrency for mode in MODES}
    profiles = {}
    try:
        with kiln_serve(work / "models", MODEL, log, flags) as (server, rest_port, grpc_port), \
                load_generator(str(example.servable), server.pid, rest_port, grpc_port) as run:
            for round_ in range(args.rounds):
                for callers in concurrency:
                    for mode in MODES:
                        window = run(mode, callers, args.seconds)
                        windows[mode, callers].append(window)
                        print(f"round {round_ + 1}/{args.rounds}: {mode} C={callers} "
                              f"{window.requests / window.seconds:.0f}/s", flush=True)
            if args.profile_seconds > 0:
                for mode in ("rest", "grpc"):
                    profiles[mode] = profile_server(server.pid, run, mode, args.profile_seconds, args.profile_callers,
                                                    args.out / f"serve_overhead_profile_{mode}.txt")
    except ServerError as e:
        print(f"serve_overhead: {e}", file=sys.stderr)
        if log.exists():
            print(f"kiln serve's log ({log}), all but its INFO lines:", *server_problems(log), sep="\n", file=sys.stderr)
        sys.exit(1)
    problems = server_problems(log)
    if problems:
        print(f"kiln serve's log ({log}) has {len(problems)} lines above INFO:", *problems[-50:], sep="\n",
              file=sys.stderr)
    results = {"model": MODEL, "batch": 1, "rounds": args.rounds, "seconds": args.seconds,
               "cpus": len(os.sched_getaffinity(0)), "serve_flags": flags,
               "server_log_lines_above_info": len(problems), "concurrency": {}}
    for callers in concurrency:
        row = {mode: summarize(windows[mode, callers]) for mode in MODES}
        for mode in ("rest", "grpc"):
            row[f"{mode}_vs_engine"] = row[mode]["requests_per_second"] / row["engine"]["requests_per_second"]
            # In the engine mode the load generator's process is the engine: its CPU is the engine's.
            row[mode]["server_cpu_beyond_engine_us_per_request"] = (
                row[mode]["server_cpu_us_per_request"] - row["engine"]["load_generator_cpu_us_per_request"])
        results["concurrency"][str(callers)] = row
    if profiles:
        results["profile"] = profiles
    write_results("serve_overhead", results, args.out)
    plot(results, args.out / "serve_overhead.png")
    if not problems:
        shutil.rmtree(work, ignore_errors=True)


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    rows = results["concurrency"]
    callers = [int(c) for c in rows]
    profiles = {mode: p for mode, p in results.get("profile", {}).items() if "layers" in p}
    rows_of_plots = 2 if profiles else 1
    fig, axes = plt.subplots(rows_of_plots, 2, figsize=(13, 4.5 * rows_of_plots), squeeze=False)
    axes = axes.ravel()
    labels = {"engine": "engine called directly", "rest": "kiln serve, REST JSON", "grpc": "kiln serve, gRPC"}
    for mode, label in labels.items():
        axes[0].plot(callers, [rows[str(c)][mode]["requests_per_second"] for c in callers], marker="o", label=label)
        axes[1].plot(callers, [rows[str(c)][mode]["server_cpu_us_per_request"] for c in callers], marker="o",
                     label=f"{mode}: server")
        axes[1].plot(callers, [rows[str(c)][mode]["load_generator_cpu_us_per_request"] for c in callers],
                     marker="x", linestyle="--", label=f"{mode}: load generator" + (" (= engine)" if mode == "engine" else ""))
    axes[0].set_ylabel("predictions per second (median)")
    axes[0].set_title(f"{results['model']}, batch 1, closed loop, {results['cpus']} CPUs")
    axes[1].set_ylabel("CPU µs per request (median)")
    axes[1].set_title("CPU per request: server and load generator")
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(callers, [str(c) for c in callers])
        ax.set_xlabel("concurrent callers")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    for ax, (mode, profile) in zip(axes[2:], profiles.items()):
        layers = list(reversed(profile["layers"]))
        ax.barh([entry["layer"] for entry in layers], [entry["active_us_per_request"] for entry in layers])
        ax.set_xlabel("µs per request in the server's Python threads (py-spy)")
        ax.set_title(f"kiln serve {mode}, {profile['callers']} callers: where the time goes")
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
