"""A simulated day of bursty traffic replayed against warm pools of 0, 1, 2 and 4 instances:
cold-start fraction, latency percentiles and GB-seconds, as JSON and a PNG.

The platform is simulated, not deployed: a discrete-event simulation of a serverless platform's
instances, fed with Kiln's own measured numbers. Why: a real day on Lambda or Cloud Run costs a day
and a cloud account per pool size, and no two runs would see the same traffic; simulated, the same
seeded day meets every pool size, in seconds, and the run is repeatable. What it cannot show is the
platform's own start-up (sandbox, image) on top of Kiln's: give it with --cold-start-seconds.

Traffic (seeded): client sessions arrive as a non-homogeneous Poisson process whose rate follows a
daily curve (--night-rate at night, rising as sin² to --peak-rate at 14:00) multiplied by
--burst-multiplier during flash crowds (--bursts a day at uniform times, exponentially long with mean
--burst-minutes). Each session sends its requests at once (a page of predictions, a fan-out):
1 + a geometric number, --fanout on average, within 5 ms. Generated a second at a time (the rate is
constant within a second, so a Poisson count a second with uniform times is the process exactly).

Platform: one instance serves --concurrency requests at a time (Lambda: 1). The warm pool's instances
are always started. A request takes a free slot on a pool instance, else on an on-demand instance
already started (the oldest first), else starts a new one: it waits the cold start, then its service
time. An on-demand instance stops after --idle-timeout seconds without requests, as Lambda's and
Cloud Run's idle instances do (Lambda does not document its timeout; Cloud Run keeps idle instances
up to 15 minutes). The cold start is the median of `kiln coldstart` runs of the digits example (fresh
process to first answer), the service time the median of engine.run at batch 1; both can be given.

GB-seconds: warm pool (instances × memory × the day) plus active (memory × the seconds instances
spend starting on demand or serving requests; what Lambda bills as duration), and separately the
on-demand instances' whole lifetimes (start to idle stop: what instance-billed Cloud Run charges).
Beside each simulated fraction stands warmpool.plan's Erlang-B overflow fraction for the same pool,
from the day's per-minute arrival rates, and the hourly plan `kiln warmpool plan` would make.

    python load/warm_pool_day.py [--pools 0,1,2,4] [--seed 7] [--cold-start-seconds S] [--service-seconds S]
"""

from __future__ import annotations

import argparse
import heapq
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, example_servables, pyplot, write_results

DAY = 86_400


def traffic(args, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[tuple[float, float]]]:
    """The day's request arrival times (sorted), its session rate a second, and the flash crowds."""
    hours = np.arange(DAY) / 3600
    shape = np.where((hours > 6) & (hours < 22), np.sin(np.pi * (hours - 6) / 16) ** 2, 0.0)
    rate = args.night_rate + (args.peak_rate - args.night_rate) * shape
    crowds = []
    for start in rng.uniform(0, DAY, rng.poisson(args.bursts)):
        length = rng.exponential(args.burst_minutes * 60)
        crowds.append((float(start), float(min(DAY, start + length))))
        rate[int(start):int(min(DAY, start + length))] *= args.burst_multiplier
    counts = rng.poisson(rate)
    sessions = np.repeat(np.arange(DAY, dtype=float), counts) + rng.random(int(counts.sum()))
    sizes = rng.geometric(1 / args.fanout, len(sessions))  # 1, 2, ... with mean --fanout
    arrivals = np.repeat(sessions, sizes) + rng.uniform(0, 0.005, int(sizes.sum()))
    return np.sort(arrivals), rate, crowds


def simulate(arrivals: list[float], pool: int, *, cold_start: float, service: float, concurrency: int,
             idle_timeout: float, memory_gb: float) -> dict:
    """Replay the arrivals against `pool` always-warm instances plus on-demand ones (see the docstring)."""
    active = [0] * pool  # requests in service, per instance (pool instances first)
    ready = [0.0] * pool  # when each instance can serve
    started: list[float] = []  # on-demand instances' start times, by id - pool
    idle_since: dict[int, float] = {}  # on-demand instances with nothing to do, since when
    alive: list[int] = []  # on-demand instances running, oldest first
    lifetimes = 0.0
    ends: list[tuple[float, int]] = []  # (end of a request, instance)
    latencies = np.empty(len(arrivals))
    cold = 0
    peak = 0
    for i, t in enumerate(arrivals):
        while ends and ends[0][0] <= t:
            end, instance = heapq.heappop(ends)
            active[instance] -= 1
            if instance >= pool and not active[instance]:
                idle_since[instance] = end
        for instance in [n for n in alive if n in idle_since and idle_since[n] + idle_timeout <= t]:
            lifetimes += idle_since.pop(instance) + idle_timeout - started[instance - pool]
            alive.remove(instance)
        chosen = next((n for n in range(pool) if active[n] < concurrency), None)
        if chosen is None:
            chosen = next((n for n in alive if active[n] < concurrency), None)
        if chosen is None:
            chosen = pool + len(started)
            started.append(t)
            active.append(0)
            ready.append(t + cold_start)
            alive.append(chosen)
            peak = max(peak, len(alive))
        idle_since.pop(chosen, None)
        begin = max(t, ready[chosen])
        cold += begin > t
        active[chosen] += 1
        heapq.heappush(ends, (begin + service, chosen))
        latencies[i] = begin + service - t
    for instance in alive:  # still running at midnight: until then, or until they went idle long enough
        lifetimes += min(DAY, idle_since.get(instance, DAY) + idle_timeout) - started[instance - pool]
    active_seconds = len(arrivals) * service + len(started) * cold_start
    return {
        "cold_starts": int(cold), "cold_start_fraction": cold / len(arrivals),
        "instances_started": len(started), "most_on_demand_at_once": peak,
        "p50_ms": 1000 * float(np.percentile(latencies, 50)), "p99_ms": 1000 * float(np.percentile(latencies, 99)),
        "p999_ms": 1000 * float(np.percentile(latencies, 99.9)), "max_ms": 1000 * float(latencies.max()),
        "warm_pool_gb_seconds": pool * memory_gb * DAY, "active_gb_seconds": active_seconds * memory_gb,
        "gb_seconds": pool * memory_gb * DAY + active_seconds * memory_gb,
        "on_demand_instance_gb_seconds": lifetimes * memory_gb,
    }


def measure(runs: int) -> tuple[float, float, dict]:
    """The digits example's cold start (median of `runs` fresh processes) and its service time
    (median of 2,000 engine.run calls at batch 1, after warm-up)."""
    from runtime.engines import open_servable
    from runtime.engines.base import synthetic_inputs
    from runtime.repository import warm_up
    from warmpool.coldstart import measure as coldstart

    servable = example_servables(Path(tempfile.mkdtemp(prefix="kiln-warm-pool-day-")), ["digits"])["digits"].servable
    phases = coldstart(str(servable), runs=runs)
    engine = open_servable(servable)
    try:
        warm_up(engine)
        inputs = synthetic_inputs(engine.signature("serving_default"), 1)
        times = []
        for _ in range(2000):
            begun = time.perf_counter()
            engine.run("serving_default", inputs)
            times.append(time.perf_counter() - begun)
    finally:
        engine.close()
    return phases["total_seconds"], statistics.median(times), {
        "coldstart_phases": phases["phases"], "coldstart_total_seconds": phases["total_seconds"],
        "coldstart_runs": runs, "service_seconds": statistics.median(times)}


def predicted(arrivals: np.ndarray, pool: int, service: float, concurrency: int) -> dict:
    """warmpool.plan's expected overflow for a pool: Erlang B from the day's per-minute arrival rates
    (request-weighted), and the log's own (requests that found the pool's slots all in service)."""
    from warmpool.plan import buckets_from_requests, erlang_b, overflow

    per_minute = np.bincount((arrivals // 60).astype(int), minlength=DAY // 60)
    erlang = sum(n * erlang_b(pool * concurrency, n / 60 * service) for n in per_minute.tolist() if n)
    (whole_day,) = buckets_from_requests([(float(t), service) for t in arrivals], bucket_minutes=1440,
                                         observed=(0.0, float(DAY)))
    return {"erlang_b_overflow_fraction": erlang / len(arrivals),
            "log_overflow_fraction": overflow(pool * concurrency, 0.0, whole_day.seen)}


def hourly_plans(arrivals: np.ndarray, service: float, concurrency: int, memory_gb: float) -> dict:
    """What `kiln warmpool plan --traffic` makes of the day's log in hourly buckets, by headroom rule."""
    from warmpool.plan import Headroom, buckets_from_requests, make_plan

    buckets = buckets_from_requests([(float(t), service) for t in arrivals], observed=(0.0, float(DAY)))
    plans = {}
    for headroom in ("sqrt:1", "target:0.01"):
        plan = make_plan(traffic=buckets, concurrency=concurrency, memory_gb=memory_gb,
                         headroom=Headroom.parse(headroom))
        plans[headroom] = {"instances_by_hour": [w.instances for w in plan.windows
                                                 for _ in range((w.end - w.start) // 60)], **plan.totals.to_builtins()}
    return plans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", default="0,1,2,4")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--night-rate", type=float, default=0.002, help="sessions/s at night")
    parser.add_argument("--peak-rate", type=float, default=0.05, help="sessions/s at 14:00")
    parser.add_argument("--bursts", type=float, default=8, help="flash crowds a day (mean)")
    parser.add_argument("--burst-minutes", type=float, default=5)
    parser.add_argument("--burst-multiplier", type=float, default=20)
    parser.add_argument("--fanout", type=float, default=2.0, help="requests a session sends at once (mean)")
    parser.add_argument("--concurrency", type=int, default=1, help="requests an instance serves at once (Lambda: 1)")
    parser.add_argument("--idle-timeout", type=float, default=600)
    parser.add_argument("--memory-gb", type=float, default=1.0)
    parser.add_argument("--cold-start-seconds", type=float, help="default: measured (kiln coldstart of digits)")
    parser.add_argument("--service-seconds", type=float, help="default: measured (engine.run of digits, batch 1)")
    parser.add_argument("--coldstart-runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "load" / "results")
    args = parser.parse_args()

    measured = {}
    cold_start, service = args.cold_start_seconds, args.service_seconds
    if cold_start is None or service is None:
        measured_cold, measured_service, measured = measure(args.coldstart_runs)
        cold_start = measured_cold if cold_start is None else cold_start
        service = measured_service if service is None else service
    rng = np.random.default_rng(args.seed)
    arrivals, rate, crowds = traffic(args, rng)
    times = arrivals.tolist()
    results = {
        "simulated": "discrete-event simulation of the platform's instances (see the docstring)",
        "parameters": {**{k: v for k, v in vars(args).items() if k not in ("out", "pools")},
                       "cold_start_seconds": cold_start, "service_seconds": service},
        "measured": measured,
        "day": {"requests": len(times), "flash_crowds": len(crowds),
                "peak_requests_per_minute": int(np.bincount((arrivals // 60).astype(int)).max())},
        "pools": {},
        "hourly_plans": hourly_plans(arrivals, service, args.concurrency, args.memory_gb),
    }
    for pool in [int(p) for p in args.pools.split(",")]:
        begun = time.perf_counter()
        row = simulate(times, pool, cold_start=cold_start, service=service, concurrency=args.concurrency,
                       idle_timeout=args.idle_timeout, memory_gb=args.memory_gb)
        row |= predicted(arrivals, pool, service, args.concurrency)
        row["simulation_seconds"] = time.perf_counter() - begun
        results["pools"][str(pool)] = row
    write_results("warm_pool_day", results, args.out)
    plot(results, arrivals, crowds, args.out / "warm_pool_day.png")


def plot(results: dict, arrivals: np.ndarray, crowds: list[tuple[float, float]], path: Path) -> None:
    plt = pyplot()
    pools = list(results["pools"])
    rows = [results["pools"][p] for p in pools]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    day, cold, p99, cost = axes.flat
    per_minute = np.bincount((arrivals // 60).astype(int), minlength=DAY // 60)
    day.plot(np.arange(len(per_minute)) / 60, per_minute, lw=0.7)
    for start, end in crowds:
        day.axvspan(start / 3600, end / 3600, color="tab:red", alpha=0.15)
    day.set(xlabel="hour of the day", ylabel="requests per minute", yscale="symlog", xlim=(0, 24),
            title=f"the simulated day: {results['day']['requests']:,} requests (flash crowds shaded)")
    xs = np.arange(len(pools))
    for offset, key, label in ((-0.27, "cold_start_fraction", "simulated"),
                               (0, "log_overflow_fraction", "plan, from the log (upper bound)"),
                               (0.27, "erlang_b_overflow_fraction", "plan, Erlang B from λ and W")):
        cold.bar(xs + offset, [100 * r[key] for r in rows], 0.27, label=label)
    cold.set(xticks=xs, xticklabels=pools, xlabel="warm pool (instances)", ylabel="cold-start fraction (%)",
             yscale="symlog", ylim=(0, 200), title="requests that waited for a cold start")
    cold.yaxis.set_major_formatter("{x:g}")
    cold.legend()
    p99.bar(xs - 0.2, [r["p99_ms"] for r in rows], 0.4, label="p99")
    p99.bar(xs + 0.2, [r["p999_ms"] for r in rows], 0.4, label="p99.9")
    p99.set(xticks=xs, xticklabels=pools, xlabel="warm pool (instances)", ylabel="latency (ms)", yscale="log",
            title=f"latency (cold start {results['parameters']['cold_start_seconds'] * 1000:.0f} ms, "
                  f"service {results['parameters']['service_seconds'] * 1000:.2f} ms)")
    p99.legend()
    pool_cost = [r["warm_pool_gb_seconds"] for r in rows]
    cost.bar(xs - 0.2, pool_cost, 0.4, color="tab:blue", label="warm pool")
    cost.bar(xs - 0.2, [r["active_gb_seconds"] for r in rows], 0.4, bottom=pool_cost, color="tab:orange",
             label="+ active: starting, serving (Lambda)")
    cost.bar(xs + 0.2, pool_cost, 0.4, color="tab:blue")
    cost.bar(xs + 0.2, [r["on_demand_instance_gb_seconds"] for r in rows], 0.4, bottom=pool_cost, color="tab:green",
             label="+ on-demand instances' lifetimes (Cloud Run)")
    cost.set(xticks=xs, xticklabels=pools, xlabel="warm pool (instances)", ylabel="GB-seconds a day",
             title=f"cost at {results['parameters']['memory_gb']:g} GB an instance")
    cost.legend()
    fig.suptitle("A day of bursty traffic against warm pools (simulated platform, measured Kiln cold start)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
