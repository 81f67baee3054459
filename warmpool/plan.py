"""Warm pool sizing: how many instances to keep warm, window by window, what that costs and what it buys.

Pure functions, no I/O: `kiln warmpool plan` (warmpool.commands) reads the files (warmpool.files: the
schedule, the observed traffic and the plan they give) and prints.

The model
---------
Little's law: the mean number of requests in service is L = λ·W. One instance serves `concurrency`
requests at once (Lambda: 1; Cloud Run: containerConcurrency), so a pool of N instances has N·c slots.
Arrivals are bursty around their mean, so the pool gets headroom over L; three rules, chosen with
`Headroom` ("KIND:VALUE"):

- ``sqrt:K`` (default ``sqrt:1``), square-root staffing (Halfin and Whitt): slots = L + K·√L. For
  Poisson arrivals the number of requests in service is Poisson with mean L and standard deviation √L,
  so K counts standard deviations of burst above the mean, the headroom growing slower than the load.
  With K = 1, L = 2 gets 4 instances and 9.5% of requests overflow them (L = 8: 11 and 8.1%;
  L = 50: 58 and 3.2%); with K = 2, 5 (3.7%), 14 (1.7%) and 65 (0.6%).
- ``factor:F``: slots = F·L, a fixed proportion (F = 1.5: half as much again).
- ``target:P``: the fewest instances whose expected cold-start fraction (below) is at most P.

Warm instances N = max(schedule minimum, ceil(slots / concurrency)) for each window.

Cost: keeping N instances of M GB warm for T seconds is N·M·T GB-seconds (what Lambda's provisioned
concurrency and Cloud Run's idle minimum instances are billed by, besides the requests themselves).

Expected cold-start fraction: the share of requests that find every warm slot busy and so need an
instance outside the pool. With Poisson arrivals and no queue in front of the pool (a request that finds
it full goes to another instance rather than waiting), that is Erlang's loss formula
B(s, L) for s = N·c slots, which holds for any distribution of service times with mean W (the
insensitivity of the Erlang loss system): only λ and W are needed. It is an upper bound on true cold
starts: an overflowing request that finds an instance still warm from an earlier overflow (platforms
keep idle instances for minutes) starts nothing. load/warm_pool_day.py compares it with a simulation
that keeps them.

Where the traffic comes as a log of requests, the plan counts instead, for each request, how many of
the log's requests were in service when it arrived; the share that found at least N·c is the log's own
overflow fraction, used in place of Erlang B (and by ``target:P``). It keeps what the Poisson
assumption loses: requests a client fans out together, bursts shorter than a bucket. It is an upper
bound for the same reason.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from runtime.errors import ConfigError
from warmpool.files import DAY, WEEK, Plan, PlanWindow, Schedule, Totals, Traffic, TrafficBucket, Window, zone

# The model --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Headroom:
    """How far above the mean load L the pool is sized: see the module's docstring."""

    kind: Literal["sqrt", "factor", "target"] = "sqrt"
    value: float = 1.0

    @classmethod
    def parse(cls, text: str) -> Headroom:
        kind, _, raw = text.partition(":")
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        valid = {"sqrt": value >= 0, "factor": value >= 1, "target": 0 < value < 1}
        if kind not in valid or not valid[kind]:
            raise ConfigError(
                f"headroom must be sqrt:K (K >= 0), factor:F (F >= 1) or target:P (0 < P < 1), got {text!r}"
            )
        return cls(kind, value)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.kind}:{self.value:g}"


def erlang_b(servers: int, load: float) -> float:
    """Erlang's loss formula: the probability that an arrival finds all `servers` busy when the
    offered load is `load` (= λ·W), by its stable recurrence B(k) = L·B(k-1) / (k + L·B(k-1))."""
    if load <= 0:
        return 0.0
    blocked = 1.0
    for k in range(1, servers + 1):
        blocked = load * blocked / (k + load * blocked)
    return blocked


def overflow(slots: int, load: float, seen: Sequence[int] | None = None) -> float:
    """The expected share of requests that find `slots` warm slots busy: the log's own where it is
    known (the requests that arrived while at least `slots` others were in service), else Erlang B."""
    if seen is None:
        return erlang_b(slots, load)
    return sum(seen[slots:]) / sum(seen) if sum(seen) else 0.0


def warm_instances(
    rate: float, latency: float, concurrency: int, headroom: Headroom, seen: Sequence[int] | None = None
) -> int:
    """Instances for traffic (λ, W): ceil(slots / concurrency), slots from L = λ·W by the headroom rule."""
    load = rate * latency
    if load <= 0:
        return 0
    if headroom.kind == "target":
        instances = math.ceil(load / concurrency)
        while overflow(instances * concurrency, load, seen) > headroom.value:
            instances += 1
        return instances
    slots = load + headroom.value * math.sqrt(load) if headroom.kind == "sqrt" else load * headroom.value
    return math.ceil(slots / concurrency - 1e-9)  # 3.0000000000000004 slots are 3


def traffic_buckets(traffic: Traffic, timezone: str = "UTC") -> list[TrafficBucket]:
    """The traffic as buckets: its own, or those derived from its requests (see the docstring)."""
    if not traffic.requests:
        return list(traffic.buckets)
    if traffic.buckets:
        raise ConfigError("traffic gives both buckets and requests: give one of them")
    return buckets_from_requests(
        traffic.requests,
        timezone,
        bucket_minutes=traffic.bucket_minutes,
        weekly=traffic.profile == "weekly",
        observed=(traffic.observed_from, traffic.observed_to),
    )


def buckets_from_requests(
    requests: Sequence[tuple[float, float]],
    timezone: str = "UTC",
    *,
    bucket_minutes: int = 60,
    weekly: bool = False,
    observed: tuple[float | None, float | None] = (None, None),
) -> list[TrafficBucket]:
    """λ and W per bucket of the (local) day from (epoch seconds, duration) pairs: λ is the bucket's
    requests over the seconds of it the log covers, W their mean duration; and how many requests of
    the log each found in service (`seen`)."""
    tz = zone(timezone)
    times = [t for t, _ in requests]
    first, last = observed
    if first is None:
        start = datetime.fromtimestamp(min(times), tz)
        first = start.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
    if last is None:
        end = datetime.fromtimestamp(max(times), tz)
        last = end.replace(hour=0, minute=0, second=0, microsecond=0).timestamp() + 86400
    if last <= first:
        raise ConfigError("traffic: observed_to must come after observed_from")

    def key(t: float) -> tuple[int, int]:
        local = datetime.fromtimestamp(t, tz)
        return local.weekday() if weekly else 0, (local.hour * 60 + local.minute) // bucket_minutes

    exposure: dict[tuple[int, int], float] = defaultdict(float)
    minute = first
    while minute < last:  # a minute at a time: local midnight and DST stay exact
        exposure[key(minute)] += min(60.0, last - minute)
        minute += 60.0
    counts: dict[tuple[int, int], int] = defaultdict(int)
    durations: dict[tuple[int, int], float] = defaultdict(float)
    seen: dict[tuple[int, int], list[int]] = defaultdict(list)
    in_service: list[float] = []  # end times, a heap
    for t, duration in sorted(requests):
        while in_service and in_service[0] <= t:
            heapq.heappop(in_service)
        if first <= t < last:
            where = key(t)
            counts[where] += 1
            durations[where] += duration
            histogram = seen[where]
            histogram.extend([0] * (len(in_service) + 1 - len(histogram)))
            histogram[len(in_service)] += 1
        heapq.heappush(in_service, t + duration)
    mean = sum(durations.values()) / max(1, sum(counts.values()))
    buckets = []
    for (day, index), seconds in sorted(exposure.items()):
        n = counts.get((day, index), 0)
        buckets.append(
            TrafficBucket(
                days=(day,) if weekly else None,
                start=index * bucket_minutes,
                end=(index + 1) * bucket_minutes,
                rate=n / seconds,
                latency=durations[(day, index)] / n if n else mean,
                seen=tuple(seen.get((day, index), ())),
            )
        )
    return buckets


def make_plan(
    schedule: Schedule | None = None,
    traffic: Sequence[TrafficBucket] | None = None,
    *,
    concurrency: int = 1,
    memory_gb: float = 1.0,
    headroom: Headroom = Headroom(),
    timezone: str | None = None,
) -> Plan:
    """The warm instances for every stretch of the day (or week, where any window names days)."""
    if concurrency < 1:
        raise ConfigError(f"concurrency must be at least 1, got {concurrency}")
    if memory_gb <= 0:
        raise ConfigError(f"memory must be positive, got {memory_gb} GB")
    memory_gb = float(memory_gb)  # as a plan file holds it, however it was given
    minimums = schedule.windows if schedule else []
    buckets = list(traffic or [])
    tz = timezone or (schedule.timezone if schedule else "UTC")
    zone(tz)
    horizon = WEEK if any(w.days is not None for w in [*minimums, *buckets]) else DAY
    minimum_spans = [(m.min_instances, m.spans(horizon)) for m in minimums]
    bucket_spans = [(b, b.spans(horizon)) for b in buckets]
    cuts = {0, horizon, *range(DAY, horizon, DAY)}
    for _, spans in [*minimum_spans, *bucket_spans]:
        cuts.update(x for span in spans for x in span)
    edges = sorted(cuts)

    # Each stretch between two cuts has one minimum and at most one bucket: its row of the plan.
    rows: list[tuple[int, int, int, tuple]] = []  # (day, start, end, values)
    for a, b in zip(edges, edges[1:]):
        floor = max((n for n, spans in minimum_spans if _covers(spans, a)), default=0)
        covering = [bucket for bucket, spans in bucket_spans if _covers(spans, a)]
        if len(covering) > 1:
            raise ConfigError(f"traffic buckets overlap: {covering[0].describe()} and {covering[1].describe()}")
        rate: float | None
        latency: float | None
        if covering:
            rate, latency, seen = covering[0].rate, covering[0].latency, covering[0].seen
        else:
            rate, latency, seen = (0.0, 0.0, None) if buckets else (None, None, None)
        values = (floor, rate, latency, seen)
        day = a // DAY
        if rows and rows[-1][0] == day and rows[-1][2] == a - day * DAY and rows[-1][3] == values:
            rows[-1] = (day, rows[-1][1], b - day * DAY, values)
        else:
            rows.append((day, a - day * DAY, b - day * DAY, values))

    days_of: dict[tuple[int, int, tuple], list[int]] = defaultdict(list)
    for day, start, end, values in rows:
        days_of[(start, end, values)].append(day)
    windows = []
    for (start, end, (floor, rate, latency, seen)), days in sorted(
        days_of.items(), key=lambda item: (item[1][0], item[0][0])
    ):
        instances = floor if rate is None else max(floor, warm_instances(rate, latency, concurrency, headroom, seen))
        load = None if rate is None else rate * latency
        windows.append(
            PlanWindow(
                days=None if horizon == DAY or len(days) == 7 else tuple(days),
                start=start,
                end=end,
                instances=instances,
                schedule_min=floor,
                rate=rate,
                latency=latency,
                load=load,
                gb_seconds=instances * memory_gb * (end - start) * 60,
                cold_start_fraction=None if load is None else overflow(instances * concurrency, load, seen),
            )
        )
    plan = Plan(
        timezone=tz, concurrency=concurrency, memory_gb=memory_gb, headroom=str(headroom), windows=tuple(windows)
    )
    return plan.replace(totals=totals(plan))


def _covers(spans: list[tuple[int, int]], minute: int) -> bool:
    return any(a <= minute < b for a, b in spans)


def occurrences(window: Window, horizon: int) -> int:
    """How many times the window recurs in the horizon."""
    return 1 if horizon == DAY else 7 if window.days is None else len(window.days)


def totals(plan: Plan) -> Totals:
    """GB-seconds of the warm pool per day; requests per day and their expected cold-start fraction
    (weighted by requests) where the plan knows its traffic."""
    horizon = plan.horizon
    days = horizon // DAY
    gb_seconds = requests = cold = 0.0
    known = False
    for w in plan.windows:
        times = occurrences(w, horizon)
        gb_seconds += w.gb_seconds * times
        if w.rate is not None:
            known = True
            arrivals = w.rate * (w.end - w.start) * 60 * times
            requests += arrivals
            cold += arrivals * (w.cold_start_fraction or 0.0)
    return Totals(
        gb_seconds_per_day=gb_seconds / days,
        requests_per_day=requests / days if known else None,
        cold_start_fraction=cold / requests if requests else (0.0 if known else None),
        max_instances=max((w.instances for w in plan.windows), default=0),
    )


# Reading a plan back: the instances at a moment, and where they change -------------------------


def instances_at(plan: Plan, when: datetime) -> int:
    """The plan's warm instances at a moment (0 where no window covers it)."""
    local = when.astimezone(zone(plan.timezone))
    minute = local.hour * 60 + local.minute
    for w in plan.windows:
        if (w.days is None or local.weekday() in w.days) and w.start <= minute < w.end:
            return w.instances
    return 0


@dataclass(frozen=True)
class Change:
    """From `minute` after midnight on each of `days` (None: every day), keep `instances` warm."""

    days: tuple[int, ...] | None
    minute: int
    instances: int


def changes(plan: Plan) -> list[Change]:
    """Where the warm instances change over the plan's day or week, grouped by time of day and
    count; [] for a plan that keeps one count throughout."""
    horizon = plan.horizon
    segments = sorted((a, b, w.instances) for w in plan.windows for a, b in w.spans(horizon))
    timeline: list[tuple[int, int]] = []  # (start minute, instances), gaps holding 0
    at = 0
    for a, b, n in segments:
        if a > at:
            timeline.append((at, 0))
        timeline.append((a, n))
        at = max(at, b)
    if at < horizon:
        timeline.append((at, 0))
    points = [(minute, n) for i, (minute, n) in enumerate(timeline) if n != timeline[i - 1][1]]
    grouped: dict[tuple[int, int], list[int]] = defaultdict(list)
    for minute, n in points:
        grouped[(minute % DAY, n)].append(minute // DAY)
    return [
        Change(None if horizon == DAY or len(days) == 7 else tuple(days), minute, n)
        for (minute, n), days in sorted(grouped.items(), key=lambda item: (item[1][0], item[0][0]))
    ]
