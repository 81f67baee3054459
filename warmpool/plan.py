"""Warm pool sizing: how many instances to keep warm, window by window, what that costs and what it buys.

Pure functions, no I/O: `kiln warmpool plan` (warmpool.commands) reads the files and prints.

Inputs
------
A schedule: recurring windows, each with the fewest instances to keep warm in it (overlapping windows
take the largest minimum). The file, YAML or JSON:

    timezone: Europe/Berlin      # IANA name; wall-clock times below are in it (default UTC)
    windows:
      - name: office hours       # optional, for people
        days: mon-fri            # optional (default every day): names and ranges, "mon-fri,sun" or a list
        start: "08:00"           # HH:MM; an end at or before the start runs past midnight
        end: "18:00"             # "24:00" is midnight at the end of the day
        min_instances: 2

(Unquoted 18:00 is read by YAML 1.1 as the sexagesimal number 1080, which is also its minutes after
midnight, so it means the same time.)

Observed traffic: per recurring bucket of the day, the arrival rate λ (requests/s) and the mean time
a request holds an instance W (s); or the requests themselves, from which the buckets are derived:

    buckets:                     # a profile...
      - {start: "08:00", end: "09:00", rate: 10, latency: 0.2}   # days: as in a schedule
    # ...or a log: [time, duration] pairs, time in epoch seconds or ISO 8601 (naive: UTC)
    requests: [[1718000000.0, 0.21], ["2024-06-10T08:00:01Z", 0.19]]
    bucket_minutes: 60           # the buckets a log is cut into (a divisor of 1440; default 60)
    profile: daily               # daily (default) or weekly: one profile per day of the week
    observed_from: ...           # optional: the span the log covers (default: the local midnights
    observed_to: ...             #   around its first and last request)

Times where no bucket says otherwise have no traffic. Buckets may not overlap.

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from runtime.errors import ConfigError
from runtime.record import Record

DAY = 1440  # minutes
WEEK = 7 * DAY
DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
FULL_DAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


# Times of day and days of the week as the files write them --------------------------------------


def parse_time(value) -> int:
    """Minutes after midnight from "HH:MM" (or an int of minutes, as YAML 1.1 reads 18:00)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a time of day as HH:MM, got {value!r}")
    if isinstance(value, int):
        minutes = value
    elif isinstance(value, str) and value.count(":") == 1:
        hours, _, mins = value.strip().partition(":")
        if not (hours.isdigit() and mins.isdigit() and len(mins) == 2 and int(mins) < 60):
            raise ValueError(f"expected a time of day as HH:MM, got {value!r}")
        minutes = int(hours) * 60 + int(mins)
    else:
        raise ValueError(f"expected a time of day as HH:MM, got {value!r}")
    if not 0 <= minutes <= DAY:
        raise ValueError(f"a time of day runs from 00:00 to 24:00, got {value!r}")
    return minutes


def show_time(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def parse_days(value) -> tuple[int, ...] | None:
    """Days of the week (0 = Monday) from "mon-fri,sun" or a list of names; None: every day."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    days: set[int] = set()
    for part in parts:
        if isinstance(part, int) and not isinstance(part, bool) and 0 <= part < 7:  # as plans hold them
            days.add(part)
            continue
        first, _, last = str(part).strip().lower().partition("-")
        a, b = _day(first, part), _day(last or first, part)
        days.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])  # fri-mon wraps
    if not days:
        raise ValueError("days is empty: leave it out to mean every day")
    return None if len(days) == 7 else tuple(sorted(days))


def _day(name: str, part) -> int:
    for number, (short, full) in enumerate(zip(DAY_NAMES, FULL_DAY_NAMES)):
        if name.strip() in (short, full):
            return number
    raise ValueError(f"expected day names such as mon, tue-fri or sunday, got {part!r}")


def show_days(days: tuple[int, ...] | None) -> str | None:
    """The shortest "mon-fri,sun" form of a set of days (None: every day)."""
    if days is None:
        return None
    runs: list[list[int]] = []
    for day in sorted(days):
        if runs and runs[-1][-1] == day - 1:
            runs[-1].append(day)
        else:
            runs.append([day])
    return ",".join(DAY_NAMES[r[0]] if len(r) == 1 else f"{DAY_NAMES[r[0]]}-{DAY_NAMES[r[-1]]}" for r in runs)


def parse_timestamp(value) -> float:
    """Epoch seconds from a number or an ISO 8601 string (naive: UTC)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"expected epoch seconds or an ISO 8601 time, got {value!r}") from None
    else:
        raise ValueError(f"expected epoch seconds or an ISO 8601 time, got {value!r}")
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


if TYPE_CHECKING:  # what the records' fields hold
    TimeOfDay = int  # minutes after midnight
    Days = tuple[int, ...] | None  # 0 = Monday; None: every day
    Timestamp = float  # epoch seconds
else:  # what parsing accepts: the files' forms too, which the records' __post_init__ reads into the above
    TimeOfDay = int | str  # "HH:MM", or minutes (YAML 1.1's 18:00)
    Days = str | tuple[int | str, ...] | None
    Timestamp = Any  # epoch seconds, ISO 8601 text, or a datetime (YAML's unquoted timestamps)


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"unknown time zone {name!r}: use an IANA name such as UTC or Europe/Berlin") from None


# The files ------------------------------------------------------------------------------------


class Window(Record, frozen=True, kw_only=True):
    """A recurring stretch of time: from `start` to `end` (minutes after midnight) on each of `days`
    (None: every day). An end at or before the start runs past midnight.

    Given as the files write them ("08:00", "mon-fri") or as held (480, (0, 1, 2, 3, 4)), to the
    constructor or parsed; written back as the files write them (`to_builtins`)."""

    days: Days = None
    start: TimeOfDay
    end: TimeOfDay

    def __post_init__(self) -> None:
        """The checks name their field themselves: msgspec places an error raised here at the
        record, not at a field."""
        super().__post_init__()
        for name, read in (("days", parse_days), ("start", parse_time), ("end", parse_time)):
            try:
                msgspec.structs.force_setattr(self, name, read(getattr(self, name)))
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        if self.start >= DAY:
            raise ValueError("start: a window starts before 24:00")

    def to_builtins(self) -> dict[str, Any]:
        """As the files write it: times as HH:MM, days as "mon-fri,sun" (None: every day)."""
        written = {"days": show_days(self.days), "start": show_time(self.start), "end": show_time(self.end)}
        return {**super().to_builtins(), **written}

    def spans(self, horizon: int) -> list[tuple[int, int]]:
        """The window's occurrences as [a, b) minutes of a horizon (a day, or a week from Monday 00:00)."""
        length = (self.end - self.start) % DAY or DAY
        if horizon == DAY:
            days: Iterable[int] = (0,)
        else:
            days = range(7) if self.days is None else self.days
        spans = []
        for day in days:
            a = day * DAY + self.start
            b = a + length
            spans += [(a, b)] if b <= horizon else [(a, horizon), (0, b - horizon)]
        return spans

    def describe(self) -> str:
        return f"{show_days(self.days) or 'every day'} {show_time(self.start)}-{show_time(self.end)}"


def _at_least_zero(record: Record, *names: str) -> None:
    for name in names:
        if getattr(record, name) < 0:
            raise ValueError(f"{name}: must be at least 0, got {getattr(record, name)}")


class Minimum(Window, frozen=True, kw_only=True):
    name: str = ""
    min_instances: int

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least_zero(self, "min_instances")


class Schedule(Record, frozen=True):
    timezone: str = "UTC"
    windows: tuple[Minimum, ...] = ()

    def to_builtins(self) -> dict[str, Any]:
        return {**super().to_builtins(), "windows": [w.to_builtins() for w in self.windows]}


class TrafficBucket(Window, frozen=True, kw_only=True):
    rate: float  # arrivals per second (λ)
    latency: float  # mean seconds a request holds an instance (W)
    # From a log: seen[k] of the bucket's requests arrived while k of the log's requests were in service.
    seen: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least_zero(self, "rate", "latency")
        for name in ("rate", "latency"):  # as parsing makes them, and a plan writes them
            msgspec.structs.force_setattr(self, name, float(getattr(self, name)))


class Traffic(Record, frozen=True):
    buckets: tuple[TrafficBucket, ...] = ()
    requests: tuple[tuple[Timestamp, float], ...] = ()
    bucket_minutes: int = 60
    profile: Literal["daily", "weekly"] = "daily"
    observed_from: Timestamp | None = None
    observed_to: Timestamp | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bucket_minutes < 1 or DAY % self.bucket_minutes:
            raise ValueError(f"bucket_minutes must divide a day (1440 minutes), got {self.bucket_minutes}")
        requests = []
        for index, (time, duration) in enumerate(self.requests):
            try:
                requests.append((parse_timestamp(time), float(duration)))
            except ValueError as e:
                raise ValueError(f"requests[{index}]: {e}") from None
        msgspec.structs.force_setattr(self, "requests", tuple(requests))
        for name in ("observed_from", "observed_to"):
            if (value := getattr(self, name)) is not None:
                try:
                    msgspec.structs.force_setattr(self, name, parse_timestamp(value))
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None

    def to_builtins(self) -> dict[str, Any]:
        return {**super().to_builtins(), "buckets": [b.to_builtins() for b in self.buckets]}


class PlanWindow(Window, frozen=True, kw_only=True):
    """One row of a plan: a stretch of one day (start < end, never past midnight)."""

    instances: int
    schedule_min: int
    rate: float | None = None
    latency: float | None = None
    load: float | None = None  # L = λ·W
    gb_seconds: float  # keeping `instances` warm for one occurrence of the window
    cold_start_fraction: float | None = None


class Totals(Record, frozen=True):
    gb_seconds_per_day: float
    requests_per_day: float | None
    cold_start_fraction: float | None
    max_instances: int


class Plan(Record, frozen=True, kw_only=True):
    timezone: str = "UTC"
    concurrency: int = 1
    memory_gb: float = 1.0
    headroom: str = "sqrt:1"
    windows: tuple[PlanWindow, ...]
    totals: Totals | None = None

    def to_builtins(self) -> dict[str, Any]:
        return {**super().to_builtins(), "windows": [w.to_builtins() for w in self.windows]}

    @property
    def horizon(self) -> int:
        return WEEK if any(w.days is not None for w in self.windows) else DAY


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
