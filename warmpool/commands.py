"""`kiln warmpool plan|apply` and `kiln coldstart`: files in, tables or JSON out (runtime/cli.py
defines the flags and calls these)."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import orjson

from runtime.errors import ConfigError, KilnError
from runtime.record import Record, problem

R = TypeVar("R", bound=Record)


def plan(args) -> int:
    from warmpool.files import Schedule, Traffic
    from warmpool.plan import Headroom, make_plan, traffic_buckets

    if not args.schedule and not args.traffic:
        raise ConfigError("give --schedule, --traffic or both")
    schedule = read_model(Schedule, args.schedule) if args.schedule else None
    timezone_name = args.timezone or (schedule.timezone if schedule else "UTC")
    traffic = traffic_buckets(read_model(Traffic, args.traffic), timezone_name) if args.traffic else None
    result = make_plan(
        schedule,
        traffic,
        concurrency=args.concurrency,
        memory_gb=args.memory_gb,
        headroom=Headroom.parse(args.headroom),
        timezone=timezone_name,
    )
    if args.out:
        write_model(result, Path(args.out))
    print(orjson.dumps(result.to_builtins(), option=orjson.OPT_INDENT_2).decode() if args.json else render_plan(result))
    return 0


def render_plan(plan) -> str:
    from runtime.table import table
    from warmpool.files import show_days, show_time

    def number(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    rows = [("days", "window", "min", "λ req/s", "W s", "L", "warm", "GB-s", "cold start")]
    for w in plan.windows:
        rows.append(
            (
                show_days(w.days) or "every day",
                f"{show_time(w.start)}-{show_time(w.end)}",
                str(w.schedule_min),
                number(w.rate, ".4g"),
                number(w.latency, ".3g"),
                number(w.load, ".3g"),
                str(w.instances),
                f"{w.gb_seconds:,.0f}",
                "-" if w.cold_start_fraction is None else f"{100 * w.cold_start_fraction:.2f}%",
            )
        )
    totals = plan.totals
    lines = [
        f"warm pool plan ({plan.timezone}; concurrency {plan.concurrency} per instance, {plan.memory_gb:g} GB "
        f"each, headroom {plan.headroom})",
        "",
        table(rows, right=range(2, 9)),
        "",
        f"warm pool: {totals.gb_seconds_per_day:,.0f} GB-s a day ({totals.gb_seconds_per_day * 30:,.0f} "
        f"in 30 days), at most {totals.max_instances} instance{'' if totals.max_instances == 1 else 's'}",
    ]
    if totals.requests_per_day is not None:
        lines.append(
            f"traffic: {totals.requests_per_day:,.0f} requests a day, expected cold-start fraction "
            f"{100 * (totals.cold_start_fraction or 0):.3f}% (Erlang B: requests finding the pool busy)"
        )
    return "\n".join(lines)


def apply(args) -> int:
    from warmpool.files import Plan

    plan_ = read_model(Plan, args.plan)
    at = _moment(args.at) if args.at else datetime.now(UTC)
    if bool(args.lambda_function) == bool(args.cloud_run_service):
        raise ConfigError("give one of --lambda-function NAME or --cloud-run-service [PATH]")
    if args.lambda_function:
        from warmpool.apply import apply_lambda

        done = apply_lambda(plan_, args.lambda_function, args.alias, at=at, schedule=args.scheduled_actions)
        print(
            f"Lambda {done.function}:{done.alias}: provisioned concurrency "
            f"{done.instances if done.instances else 'removed (0)'} for {at.isoformat(timespec='minutes')}"
        )
        for action in done.scheduled:
            print(
                f"  scheduled {action['name']}: {action['Schedule']} {action['Timezone']} -> "
                f"{action['ScalableTargetAction']['MinCapacity']}"
            )
        for name in done.deleted:
            print(f"  deleted stale scheduled action {name}")
        return 0
    from warmpool.apply import apply_cloud_run

    written = apply_cloud_run(plan_, Path(args.cloud_run_service), at=at, level=args.level, region=args.region)
    print(
        f"{written.path}: {written.annotation} {written.previous or '(unset)'} -> {written.instances}"
        f"{' (the file was written whole: its comments are lost)' if written.rewritten else ''}"
    )
    print("apply it with:\n  " + "\n  ".join(written.commands))
    return 0


def coldstart(args) -> int:
    from warmpool.coldstart import measure, render

    result = measure(
        args.servable,
        runs=args.runs,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        signature=args.signature,
    )
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


def read_model(model: type[R], path: str | Path) -> R:
    """A record from a YAML or JSON file (by its extension; JSON is read as YAML otherwise too)."""
    import yaml

    path = Path(path)
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid JSON or YAML: {getattr(e, 'problem', None) or e}{where}") from None
    try:
        return model.parse(data if data is not None else {})
    except ValueError as e:  # Invalid: the first problem, as 'field.path: what is wrong'
        raise ConfigError(f"{path}: {problem(e)}") from None


def write_model(value: Record, path: Path) -> None:
    import yaml

    data = value.to_builtins()
    path.write_text(
        json.dumps(data, indent=2) + "\n" if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
    )


def _moment(text: str) -> datetime:
    from warmpool.files import parse_timestamp

    try:
        return datetime.fromtimestamp(parse_timestamp(text), UTC)
    except ValueError as e:
        raise KilnError(f"--at: {e}") from None
