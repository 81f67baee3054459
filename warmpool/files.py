"""The warm pool's files: a schedule of minimum instances, the observed traffic, and the plan sized
from them (warmpool.plan), with the forms their times, days and timestamps take in YAML and JSON.

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
"""

from __future__ import annotations

from collections.abc import Iterable
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
