"""Batching under open-loop load: latency (p50, p95, p99) and throughput of `kiln serve` on the
digits CNN at 25, 50, 75 and 90 percent of its measured saturation, for no batching, TF Serving's
fixed-timeout batching and Kiln's adaptive batching, with the engine's own best throughput beside.

Why open loop: requests arrive as a Poisson process at the offered rate whatever the server does,
as independent users do; a slow answer does not slow the arrivals (a closed-loop client would wait,
and hide the queueing that makes the tail). Each request's latency runs from its scheduled arrival,
so time spent waiting for a connection on the client counts too.

How: one `kiln serve` per mode (`--batching off`, `fixed`, `adaptive`, with the same
--batch-timeout-micros), one after another, each on loopback with REST predict at batch 1 (the
row format clients send). Saturation: for each mode, --callers keep-alive connections in a closed
loop give a first figure; the open-loop generator then offers 1.2 times that, and what the server
answers is the mode's saturation (on a machine of few cores the generator's own CPU takes part, and
a closed loop, which sends in step with the answers, overstates what open arrivals can get). The
highest of the modes' saturations is the reference; the offered loads are fractions of it, the same
for every mode. The load generator runs in its own process
(spawned: it shares no interpreter lock with the server); the engine's best throughput is measured
in it too, called directly at every bucket with one caller per CPU, before the servers start.

Targets (digits, this machine): at saturation, served predictions per second at least 85 percent
of the engine's best; p99 under 10 ms at 50 percent load; adaptive p99 no worse than fixed-timeout
p99 at every load.

    python load/batching_latency.py [--loads 0.25,0.5,0.75,0.9] [--seconds 6] [--timeout-micros 2000]
                                   [--rows-per-request 1]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import HttpConnection, ServerError, example_servables, kiln_serve, pyplot, write_results

MODEL, KEY = "digits", "serving_default"
PATH = f"/v1/models/{MODEL}:predict"
MODES = ("off", "fixed", "adaptive")


def engine_best(servable: str, seconds: float) -> dict:
    """Rows per second of the engine called directly, per bucket, one caller per CPU."""
    import numpy as np

    from runtime.engines import open_servable

    engine = open_servable(servable)
    (spec,) = engine.signature(KEY).inputs
    callers = len(os.sched_getaffinity(0))
    rates = {}
    for bucket in engine.manifest.batch_sizes:
        inputs = {spec.name: np.random.default_rng(0).random((bucket, *spec.shape[1:]), dtype=np.float32)}
        engine.run(KEY, inputs)
        counts = [0] * callers
        end = time.perf_counter() + seconds

        def loop(index: int) -> None:
            while time.perf_counter() < end:
                engine.run(KEY, inputs)
                counts[index] += 1

        started = time.perf_counter()
        with ThreadPoolExecutor(callers) as pool:
            list(pool.map(loop, range(callers)))
        rates[bucket] = sum(counts) * bucket / (time.perf_counter() - started)
    engine.close()
    best = max(rates, key=rates.get)
    return {"rows_per_second_by_bucket": rates, "best_bucket": best, "best_rows_per_second": rates[best]}


def request_body(rows: int) -> bytes:
    import numpy as np
    import orjson

    image = np.random.default_rng(1).random((rows, 28, 28, 1), dtype=np.float32)
    return orjson.dumps({"instances": image.tolist()})


async def closed_loop(port: int, body: bytes, callers: int, seconds: float) -> float:
    """Requests per second with `callers` connections each sending its next request on an answer."""
    connections = [await HttpConnection.open(port, PATH, body) for _ in range(callers)]
    try:
        await asyncio.gather(*(c.post() for c in connections))
        count = 0
        end = time.perf_counter() + seconds

        async def loop(connection: HttpConnection) -> None:
            nonlocal count
            while time.perf_counter() < end:
                await connection.post()
                count += 1

        started = time.perf_counter()
        await asyncio.gather(*(loop(c) for c in connections))
        return count / (time.perf_counter() - started)
    finally:
        for connection in connections:
            connection.close()


async def open_loop(port: int, body: bytes, rate: float, seconds: float, seed: int, connections: int) -> dict:
    """Poisson arrivals at `rate` per second for `seconds`, over at most `connections` keep-alive
    connections (as a front end in front of a container holds a bounded pool): an arrival takes an
    idle one, opens one while fewer are open, else waits for one. Latency runs from the scheduled
    arrival, so that wait counts."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, size=int(rate * seconds * 1.5) + 10))
    arrivals = arrivals[arrivals < seconds]
    idle: asyncio.Queue[HttpConnection] = asyncio.Queue()
    for _ in range(min(8, connections)):
        idle.put_nowait(await HttpConnection.open(port, PATH, body))
    opened = idle.qsize()
    latencies: list[float] = []
    errors: list[str] = []
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05

    async def one(at: float) -> None:
        nonlocal opened
        if idle.empty() and opened < connections:
            opened += 1
            connection = await HttpConnection.open(port, PATH, body)
        else:
            connection = await idle.get()
        try:
            await connection.post()
            latencies.append(loop.time() - (start + at))
            idle.put_nowait(connection)
        except (ServerError, OSError, asyncio.IncompleteReadError) as e:
            errors.append(str(e)[:200])
            connection.close()
            opened -= 1

    tasks = []
    for at in arrivals:
        delay = start + at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(at)))
    await asyncio.gather(*tasks)
    finished = loop.time() - start
    while not idle.empty():
        idle.get_nowait().close()
    lat = np.array(latencies) * 1e3 if latencies else np.array([float("nan")])
    return {"offered_per_second": rate, "answered_per_second": len(latencies) / finished,
            "requests": len(arrivals), "errors": len(errors), "first_errors": errors[:3],
            "connections": opened, "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max())}


def generator(connection, rows: int) -> None:
    """The load generator's process: ("engine", servable, seconds) | ("closed", port, callers,
    seconds) | ("open", port, rate, seconds, seed, connections) -> ("ok", result) or ("error", message)."""
    body = request_body(rows)
    while (command := connection.recv()) is not None:
        try:
            kind, *args = command
            if kind == "engine":
                result = engine_best(*args)
            elif kind == "closed":
                result = asyncio.run(closed_loop(args[0], body, *args[1:]))
            else:
                result = asyncio.run(open_loop(args[0], body, *args[1:]))
            connection.send(("ok", result))
        except Exception as e:
            connection.send(("error", f"{type(e).__name__}: {e}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", default="0.25,0.5,0.75,0.9", help="fractions of saturation to offer")
    parser.add_argument("--seconds", type=float, default=6.0, help="per load level and mode")
    parser.add_argument("--saturation-seconds", type=float, default=4.0)
    parser.add_argument("--callers", type=int, default=64, help="connections: the closed loop measuring saturation "
                        "keeps them all busy; the open loop uses at most as many")
    parser.add_argument("--timeout-micros", type=int, default=2000, help="batch_timeout_micros, fixed and adaptive")
    parser.add_argument("--rows-per-request", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    loads = [float(x) for x in args.loads.split(",")]
    flags = {"off": ["--batching", "off"],
             "fixed": ["--batching", "fixed", "--batch-timeout-micros", str(args.timeout_micros)],
             "adaptive": ["--batching", "adaptive", "--batch-timeout-micros", str(args.timeout_micros)]}

    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=generator, args=(theirs, args.rows_per_request), daemon=True)
    process.start()

    def ask(*command):
        ours.send(command)
        status, value = ours.recv()
        if status != "ok":
            raise ServerError(value)
        return value

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        example = example_servables(work / "models", [MODEL])[MODEL]
        engine = ask("engine", str(example.servable), 2.0)
        saturation, closed_loop_rates, levels = {}, {}, {}
        try:
            for mode in MODES:
                with kiln_serve(work / "models", MODEL, work / f"{mode}.log", flags[mode]) as (_, port, _grpc):
                    closed = ask("closed", port, args.callers, args.saturation_seconds)
                    # What the server answers when this same open-loop generator offers more than that:
                    # on few cores the generator's own CPU counts, so this is the load it can be offered.
                    overload = ask("open", port, closed * 1.2, args.saturation_seconds, 99, args.callers)
                    saturation[mode] = overload["answered_per_second"]
                    closed_loop_rates[mode] = closed
            reference = max(saturation.values())
            for mode in MODES:
                with kiln_serve(work / "models", MODEL, work / f"{mode}.log", flags[mode]) as (_, port, _grpc):
                    ask("closed", port, 8, 1.0)  # warm: queues learn, connections open
                    levels[mode] = [{"load": load, **ask("open", port, reference * load, args.seconds, index,
                                                         args.callers)}
                                    for index, load in enumerate(loads)]
        finally:
            ours.send(None)
            process.join(30)

    rows = args.rows_per_request
    served = {mode: rate * rows for mode, rate in saturation.items()}
    best_mode = max(served, key=served.get)
    at_half = {mode: next((level["p99_ms"] for level in levels[mode] if level["load"] == 0.5), None) for mode in MODES}
    results = {
        "model": MODEL, "rows_per_request": rows, "timeout_micros": args.timeout_micros, "cpus": os.cpu_count(),
        "engine": engine,
        "saturation_requests_per_second": saturation,
        "closed_loop_requests_per_second": closed_loop_rates,
        "saturation_predictions_per_second": served,
        "served_vs_engine_best": {mode: value / engine["best_rows_per_second"] for mode, value in served.items()},
        "levels": levels,
        "targets": {
            "served_at_saturation_vs_engine_best": served[best_mode] / engine["best_rows_per_second"],
            "served_at_saturation_at_least_0_85": served[best_mode] / engine["best_rows_per_second"] >= 0.85,
            "p99_ms_at_half_load": at_half,
            "p99_under_10ms_at_half_load": {mode: p is not None and p < 10 for mode, p in at_half.items()},
            "adaptive_p99_vs_fixed_p99": [a["p99_ms"] / f["p99_ms"] for a, f in zip(levels["adaptive"], levels["fixed"])],
            "adaptive_no_worse_than_fixed_everywhere": all(
                a["p99_ms"] <= f["p99_ms"] for a, f in zip(levels["adaptive"], levels["fixed"])),
        },
        "median_p99_ms": {mode: statistics.median(level["p99_ms"] for level in levels[mode]) for mode in MODES},
    }
    write_results("batching_latency", results, args.out)
    plot(results, args.out / "batching_latency.png")


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    figure, (latency, throughput) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, levels in results["levels"].items():
        offered = [level["offered_per_second"] for level in levels]
        latency.plot(offered, [level["p99_ms"] for level in levels], marker="o", label=f"{mode} p99")
        latency.plot(offered, [level["p50_ms"] for level in levels], marker=".", linestyle=":", label=f"{mode} p50")
        throughput.plot(offered, [level["answered_per_second"] for level in levels], marker="o", label=mode)
    latency.set(xlabel="offered requests/s (Poisson)", ylabel="latency (ms)", yscale="log",
                title=f"digits, batch {results['rows_per_request']} per request")
    latency.axhline(10, color="grey", linewidth=0.5)
    throughput.set(xlabel="offered requests/s", ylabel="answered requests/s", title="throughput")
    for axes in (latency, throughput):
        axes.legend(fontsize=7)
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
