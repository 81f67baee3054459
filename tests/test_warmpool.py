"""Warm pool sizing (warmpool/plan.py) against hand-computed plans, and applying plans: Lambda
provisioned concurrency and Application Auto Scaling against moto's standalone server over HTTP, and
Cloud Run's service YAML (checked with test_infra's Cloud Run schema)."""

from __future__ import annotations

import io
import json
import shutil
import uuid
import zipfile
from datetime import datetime, timezone

import pytest
import yaml

from runtime.cli import main
from runtime.errors import ConfigError
from warmpool.files import Plan, Schedule, Traffic, TrafficBucket
from warmpool.plan import (Change, Headroom, buckets_from_requests, changes, erlang_b, instances_at, make_plan,
                           traffic_buckets)

MONDAY = datetime(2025, 1, 6, tzinfo=timezone.utc)  # 2025-01-06 was a Monday


def hour(start: str, end: str, rate: float, latency: float, **more) -> TrafficBucket:
    return TrafficBucket(start=start, end=end, rate=rate, latency=latency, **more)


def schedule(*windows: dict, tz: str = "UTC") -> Schedule:
    return Schedule.parse({"timezone": tz, "windows": list(windows)})


def row(plan: Plan, start: str, days: str | None = None):
    """The plan's window starting at `start` (HH:MM) on `days`."""
    found = [w for w in plan.windows if w.to_builtins()["start"] == start
             and w.to_builtins()["days"] == days]
    assert len(found) == 1, [w.to_builtins() for w in plan.windows]
    return found[0]


# The model -----------------------------------------------------------------------------------------

def test_erlang_b_known_values():
    assert erlang_b(0, 2.0) == 1.0  # no slots: every request overflows
    assert erlang_b(1, 1.0) == pytest.approx(1 / 2)
    # B(4, 2) = (2^4/4!) / (1 + 2 + 2^2/2! + 2^3/3! + 2^4/4!) = (2/3) / 7 = 2/21
    assert erlang_b(4, 2.0) == pytest.approx(2 / 21)
    assert erlang_b(3, 2.0) == pytest.approx(4 / 19)
    assert erlang_b(5, 0.0) == 0.0
    assert 0 < erlang_b(1000, 900.0) < 0.02  # the recurrence stays finite where factorials would not


def test_one_hour_of_ten_requests_a_second_hand_computed():
    # λ = 10 req/s, W = 0.2 s: L = 2 (Little's law). Square-root staffing with K = 1: 2 + √2 = 3.41
    # slots -> 4 Lambda instances. Kept warm for the hour at 2 GB: 4 × 2 × 3600 = 28,800 GB-s.
    plan = make_plan(traffic=[hour("09:00", "10:00", 10, 0.2)], memory_gb=2, headroom=Headroom("sqrt", 1))
    busy = row(plan, "09:00")
    assert (busy.load, busy.instances, busy.gb_seconds) == (pytest.approx(2.0), 4, pytest.approx(28_800))
    assert busy.cold_start_fraction == pytest.approx(2 / 21)
    assert [(w.to_builtins()["start"], w.to_builtins()["end"], w.instances)
            for w in plan.windows] == [("00:00", "09:00", 0), ("09:00", "10:00", 4), ("10:00", "24:00", 0)]
    assert plan.totals.gb_seconds_per_day == pytest.approx(28_800)
    assert plan.totals.requests_per_day == pytest.approx(36_000)
    assert plan.totals.cold_start_fraction == pytest.approx(2 / 21)  # every request is in that hour
    assert plan.totals.max_instances == 4


@pytest.mark.parametrize("headroom, instances, overflow", [
    ("sqrt:0", 2, 2 / 5),            # L exactly: 2 slots; B(2, 2) = 2 / (1 + 2 + 2) = 0.4
    ("sqrt:2", 5, None),             # 2 + 2√2 = 4.83 -> 5
    ("factor:1.5", 3, 4 / 19),       # 1.5 × 2 = 3 slots (not 4: 3.0000000000000004 is 3)
    ("target:0.05", 5, None),        # B(4, 2) = 0.095 > 0.05 >= B(5, 2) = 0.037
    ("target:0.1", 4, 2 / 21),
])
def test_headroom_rules(headroom, instances, overflow):
    plan = make_plan(traffic=[hour("09:00", "10:00", 10, 0.2)], headroom=Headroom.parse(headroom))
    busy = row(plan, "09:00")
    assert busy.instances == instances
    assert busy.cold_start_fraction == pytest.approx(overflow if overflow is not None else erlang_b(instances, 2.0))


def test_cloud_run_concurrency_shares_slots():
    # λ = 100 req/s, W = 0.5 s: L = 50; 50 + √50 = 57.07 slots, 80 per instance: 1 instance; 3 at 20.
    traffic = [hour("12:00", "13:00", 100, 0.5)]
    assert row(make_plan(traffic=traffic, concurrency=80), "12:00").instances == 1
    at_20 = row(make_plan(traffic=traffic, concurrency=20), "12:00")
    assert at_20.instances == 3 and at_20.cold_start_fraction == pytest.approx(erlang_b(60, 50.0))


def test_bad_headroom_and_sizes_are_refused():
    for text in ("sqrt", "factor:0.5", "target:1", "magic:2", "sqrt:-1"):
        with pytest.raises(ConfigError, match="headroom must be"):
            Headroom.parse(text)
    with pytest.raises(ConfigError, match="concurrency"):
        make_plan(concurrency=0)
    with pytest.raises(ConfigError, match="memory"):
        make_plan(memory_gb=0)


# Schedules and their edge cases -------------------------------------------------------------------

def test_schedule_only_keeps_the_minimums_and_knows_no_cold_starts():
    plan = make_plan(schedule({"start": "08:00", "end": "18:00", "min_instances": 2}), memory_gb=0.5)
    office = row(plan, "08:00")
    assert (office.instances, office.gb_seconds, office.cold_start_fraction) == (2, 2 * 0.5 * 36_000, None)
    assert row(plan, "00:00").instances == 0
    assert plan.totals.gb_seconds_per_day == 36_000
    assert plan.totals.requests_per_day is None and plan.totals.cold_start_fraction is None


def test_overlapping_windows_take_the_largest_minimum_and_wrap_past_midnight():
    plan = make_plan(schedule(
        {"days": "mon-fri", "start": "08:00", "end": "18:00", "min_instances": 2},
        {"start": "17:00", "end": "20:00", "min_instances": 3},
        {"days": ["fri"], "start": "22:00", "end": "02:00", "min_instances": 1},  # into Saturday
    ))
    assert row(plan, "08:00", "mon-fri").instances == 2
    assert row(plan, "17:00").instances == 3  # every day; on weekdays both windows: the larger
    assert row(plan, "20:00", "fri").instances == 0
    assert row(plan, "22:00", "fri").instances == 1
    assert row(plan, "00:00", "sat").instances == 1  # Friday's window, after midnight
    assert row(plan, "00:00", "sun").instances == 0
    # 5 days × (9 h × 2 + 3 h × 3) + 2 days × 3 h × 3 + 4 h × 1, in GB-s at 1 GB, over 7 days
    assert plan.totals.gb_seconds_per_day == pytest.approx((5 * (9 * 2 + 3 * 3) + 2 * 3 * 3 + 4) * 3600 / 7)
    assert instances_at(plan, MONDAY.replace(hour=17, minute=30)) == 3
    assert instances_at(plan, MONDAY.replace(day=11, hour=1)) == 1  # Saturday 01:00
    assert instances_at(plan, MONDAY.replace(day=12, hour=1)) == 0  # Sunday 01:00


def test_schedule_minimum_beats_smaller_traffic_and_the_pool_covers_more():
    plan = make_plan(schedule({"start": "09:00", "end": "10:00", "min_instances": 6}),
                     [hour("09:00", "10:00", 10, 0.2)])
    busy = row(plan, "09:00")
    assert (busy.schedule_min, busy.instances) == (6, 6)
    assert busy.cold_start_fraction == pytest.approx(erlang_b(6, 2.0))


def test_no_traffic_needs_no_instances():
    plan = make_plan(traffic=[hour("00:00", "24:00", 0, 0.2)])
    assert [(w.instances, w.cold_start_fraction) for w in plan.windows] == [(0, 0.0)]
    assert plan.totals.requests_per_day == 0 and plan.totals.cold_start_fraction == 0.0
    empty = make_plan()
    assert [(w.instances, w.start, w.end) for w in empty.windows] == [(0, 0, 1440)]


def test_overlapping_traffic_buckets_are_refused():
    with pytest.raises(ConfigError, match="traffic buckets overlap: every day 09:00-11:00 and every day 10:00-12:00"):
        make_plan(traffic=[hour("09:00", "11:00", 1, 0.1), hour("10:00", "12:00", 1, 0.1)])


def test_timezone_moves_the_windows():
    # Europe/Berlin is UTC+1 in January: 08:00 there is 07:00 UTC.
    plan = make_plan(schedule({"start": "08:00", "end": "09:00", "min_instances": 1}, tz="Europe/Berlin"))
    assert instances_at(plan, MONDAY.replace(hour=7, minute=30)) == 1
    assert instances_at(plan, MONDAY.replace(hour=8, minute=30)) == 0
    with pytest.raises(ConfigError, match="unknown time zone"):
        make_plan(schedule(tz="Mars/Olympus"))


def test_changes_are_grouped_by_time_and_count():
    plan = make_plan(schedule({"days": "mon-fri", "start": "08:00", "end": "18:00", "min_instances": 2},
                              {"days": "sat-sun", "start": "08:00", "end": "12:00", "min_instances": 2}))
    assert changes(plan) == [Change(None, 480, 2), Change((0, 1, 2, 3, 4), 1080, 0), Change((5, 6), 720, 0)]
    assert changes(make_plan(schedule({"start": "00:00", "end": "24:00", "min_instances": 3}))) == []


# Traffic from a log of requests -------------------------------------------------------------------

def test_traffic_from_requests_hand_computed():
    # One day observed: 3,600 requests in 09:00-10:00 UTC (one a second), alternately 0.2 s and 0.4 s.
    start = MONDAY.replace(hour=9).timestamp()
    requests = [(start + i, 0.2 if i % 2 else 0.4) for i in range(3600)]
    buckets = buckets_from_requests(requests)
    assert len(buckets) == 24
    nine = next(b for b in buckets if b.start == 540)
    assert (nine.rate, nine.latency) == (pytest.approx(1.0), pytest.approx(0.3))
    assert all(b.rate == 0 for b in buckets if b.start != 540)
    # In Berlin the same requests fall in 10:00-11:00; 30-minute buckets halve the span and keep λ.
    berlin = buckets_from_requests(requests, "Europe/Berlin", bucket_minutes=30)
    assert [(b.start, b.rate) for b in berlin if b.rate] == [(600, pytest.approx(1.0)), (630, pytest.approx(1.0))]
    # Observed for two days, the same requests arrive at half the rate.
    two_days = buckets_from_requests(requests, observed=(MONDAY.timestamp(), MONDAY.timestamp() + 2 * 86400))
    assert next(b for b in two_days if b.start == 540).rate == pytest.approx(0.5)
    plan = make_plan(traffic=buckets)  # L = 0.3: 0.3 + √0.3 = 0.85 slots -> 1 instance
    assert row(plan, "09:00").instances == 1
    # No request of the log overlaps another: none overflows (Erlang B would say L / (1 + L) = 23%).
    assert nine.seen == (3600,) and row(plan, "09:00").cold_start_fraction == 0.0

    # Fanned out in threes: L = 0.9, 0.9 + √0.9 = 1.85 slots -> 2 instances, and the third of each
    # three finds both busy: 1/3 overflow, where Erlang B, blind to the fan-out, says B(2, 0.9) = 0.176.
    threes = buckets_from_requests([request for request in requests for _ in range(3)])
    assert next(b for b in threes if b.start == 540).seen == (3600, 3600, 3600)
    fanned = row(make_plan(traffic=threes), "09:00")
    assert fanned.instances == 2 and fanned.cold_start_fraction == pytest.approx(1 / 3)
    assert erlang_b(2, 0.9) == pytest.approx(0.405 / 2.305)
    assert row(make_plan(traffic=threes, headroom=Headroom.parse("target:0.01")), "09:00").instances == 3


def test_weekly_traffic_profile_and_file_forms():
    traffic = Traffic.parse({
        "requests": [["2025-01-06T09:00:00Z", 0.1], [MONDAY.timestamp() + 9 * 3600 + 1, 0.3]],  # both forms
        "profile": "weekly", "observed_from": "2025-01-06T00:00:00Z", "observed_to": "2025-01-13T00:00:00Z"})
    buckets = traffic_buckets(traffic)
    assert len(buckets) == 7 * 24
    monday_nine = next(b for b in buckets if b.days == (0,) and b.start == 540)
    assert (monday_nine.rate, monday_nine.latency) == (pytest.approx(2 / 3600), pytest.approx(0.2))
    with pytest.raises(ValueError, match="bucket_minutes must divide a day"):
        Traffic.parse({"bucket_minutes": 7})
    with pytest.raises(ConfigError, match="both buckets and requests"):
        traffic_buckets(Traffic.parse({"requests": [[0, 1]], "buckets": [
            {"start": "00:00", "end": "01:00", "rate": 1, "latency": 1}]}))


# Files and the command line -----------------------------------------------------------------------

def test_plan_command_reads_yaml_and_writes_a_plan_apply_reads(tmp_path, capsys):
    (tmp_path / "schedule.yaml").write_text(
        "timezone: UTC\nwindows:\n"
        "  - {name: office, days: mon-fri, start: 08:00, end: 18:00, min_instances: 2}\n")  # YAML 1.1: 1080
    (tmp_path / "traffic.json").write_text(json.dumps({"buckets": [
        {"start": "09:00", "end": "10:00", "rate": 10, "latency": 0.2}]}))
    assert main(["warmpool", "plan", "--schedule", str(tmp_path / "schedule.yaml"), "--traffic",
                 str(tmp_path / "traffic.json"), "--memory-gb", "2", "--out", str(tmp_path / "plan.json")]) == 0
    table = capsys.readouterr().out
    rows = [line.split() for line in table.splitlines()]
    assert ["mon-fri", "09:00-10:00", "2", "10", "0.2", "2", "4", "28,800", "9.52%"] in rows
    assert "36,000 requests a day" in table
    plan = Plan.parse_json((tmp_path / "plan.json").read_bytes())
    assert row(plan, "08:00", "mon-fri").instances == 2 and row(plan, "09:00", "sat-sun").instances == 4
    assert main(["warmpool", "plan", "--traffic", str(tmp_path / "traffic.json"), "--json"]) == 0
    assert row(Plan.parse_json(capsys.readouterr().out.encode()), "09:00").instances == 4


@pytest.mark.parametrize("text, message", [
    ("windows:\n  - {start: '8am', end: '10:00', min_instances: 1}\n", "windows[0]: start: expected a time"),
    ("windows:\n  - {days: [funday], start: '08:00', end: '10:00', min_instances: 1}\n", "expected day names"),
    ("windows:\n  - {start: '08:00', end: '25:00', min_instances: 1}\n", "from 00:00 to 24:00"),
    ("windows:\n  - {start: '08:00', end: '10:00', min_instances: -1}\n", "windows[0]: min_instances: must be at least 0"),
    ("windows:\n  - {start: '08:00', end: '10:00', minimum: 1}\n", "windows[0].minimum: is not a known field"),
    ("windows: [\n", "is not valid JSON or YAML"),
])
def test_bad_schedule_files_get_one_line_errors(tmp_path, capsys, text, message):
    (tmp_path / "schedule.yaml").write_text(text)
    assert main(["warmpool", "plan", "--schedule", str(tmp_path / "schedule.yaml")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("kiln warmpool plan: error: ") and message in error and error.count("\n") == 1


# Applying to Cloud Run ----------------------------------------------------------------------------

def _plan_file(tmp_path, *windows: dict):
    """A plan of the schedule's windows, written where `kiln warmpool apply --plan` reads it."""
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(make_plan(schedule(*windows)).to_builtins()))
    return path


def test_cloud_run_apply_changes_only_the_min_scale(tmp_path, capsys):
    from tests.test_infra import SERVICE, cloud_run_document, cloud_run_errors

    service = tmp_path / "service.yaml"
    shutil.copy(SERVICE, service)
    plan = _plan_file(tmp_path, {"days": "mon-fri", "start": "08:00", "end": "18:00", "min_instances": 3})
    assert main(["warmpool", "apply", "--plan", str(plan), "--cloud-run-service", str(service),
                 "--at", "2025-01-06T09:00:00Z", "--region", "europe-west1"]) == 0
    out = capsys.readouterr().out
    assert f"gcloud run services replace {service} --region europe-west1" in out
    assert "# mon-fri 18:00 UTC: gcloud run services update kiln --region europe-west1 --min-instances 0" in out
    before, after = SERVICE.read_text().splitlines(), service.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and changed == [(
        '        autoscaling.knative.dev/minScale: "1"  # the warm pool: instances kept started, models loaded',
        '        autoscaling.knative.dev/minScale: "3"  # the warm pool: instances kept started, models loaded')]
    assert cloud_run_errors(cloud_run_document(service)) == []

    # Service-level minimum: a line added to the service's annotations; the file keeps using it.
    from warmpool.apply import apply_cloud_run

    written = Plan.parse_json(plan.read_bytes())
    done = apply_cloud_run(written, service, at=MONDAY.replace(day=11), level="service")
    assert (done.annotation, done.instances, done.previous, done.rewritten) == ("run.googleapis.com/minScale", 0,
                                                                                None, False)
    document = cloud_run_document(service)
    assert document["metadata"]["annotations"]["run.googleapis.com/minScale"] == "0"
    assert cloud_run_errors(document) == []
    assert len(service.read_text().splitlines()) == len(before) + 1 and "# the warm pool" in service.read_text()
    again = apply_cloud_run(written, service, at=MONDAY.replace(hour=10))
    assert (again.annotation, again.previous, again.instances) == ("run.googleapis.com/minScale", "0", 3)


def test_cloud_run_apply_writes_flow_style_files_whole_and_refuses_others(tmp_path):
    from warmpool.apply import apply_cloud_run

    plan = make_plan(schedule({"start": "00:00", "end": "24:00", "min_instances": 2}))
    service = tmp_path / "service.yaml"
    service.write_text("apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {name: s}\n"
                       "spec: {template: {spec: {containers: [{image: i}]}}}\n")
    done = apply_cloud_run(plan, service)
    assert done.rewritten and yaml.safe_load(service.read_text()) == {
        "apiVersion": "serving.knative.dev/v1", "kind": "Service", "metadata": {"name": "s"},
        "spec": {"template": {"spec": {"containers": [{"image": "i"}]},
                              "metadata": {"annotations": {"autoscaling.knative.dev/minScale": "2"}}}}}
    (tmp_path / "job.yaml").write_text("kind: Job\n")
    with pytest.raises(ConfigError, match="not a Cloud Run service"):
        apply_cloud_run(plan, tmp_path / "job.yaml")


# Applying to Lambda, against moto ------------------------------------------------------------------

@pytest.fixture
def aws(s3_endpoint, s3_env, monkeypatch):
    """boto3 pointed at moto's server (every service at one endpoint), with a function, a version and
    an alias `live`. moto 5.2 serves no provisioned-concurrency API (its Lambda routes stop at
    .../concurrency), so those two calls are answered by a botocore hook after botocore has checked
    their parameters against Lambda's API model; they are recorded for the test to read."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    iam, lambda_client = boto3.client("iam"), boto3.client("lambda")
    role = iam.create_role(RoleName=f"kiln-{uuid.uuid4().hex[:8]}", AssumeRolePolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                 "Principal": {"Service": "lambda.amazonaws.com"}}]}))["Role"]["Arn"]
    code = io.BytesIO()
    with zipfile.ZipFile(code, "w") as archive:
        archive.writestr("handler.py", "def handler(event, context):\n    return event\n")
    name = f"kiln-{uuid.uuid4().hex[:8]}"
    lambda_client.create_function(FunctionName=name, Runtime="python3.11", Role=role, Handler="handler.handler",
                                  Code={"ZipFile": code.getvalue()}, MemorySize=2048)
    version = lambda_client.publish_version(FunctionName=name)["Version"]
    lambda_client.create_alias(FunctionName=name, Name="live", FunctionVersion=version)
    calls: list[tuple[str, dict]] = []

    def record(params, model, **_):
        calls.append((model.name, params))

    def answer(model, **_):
        from botocore.awsrequest import AWSResponse

        parsed = {"RequestedProvisionedConcurrentExecutions": calls[-1][1].get("ProvisionedConcurrentExecutions"),
                  "Status": "IN_PROGRESS"} if model.name.startswith("Put") else {}
        return AWSResponse("", 202 if model.name.startswith("Put") else 204, {}, None), parsed

    for operation in ("PutProvisionedConcurrencyConfig", "DeleteProvisionedConcurrencyConfig"):
        lambda_client.meta.events.register(f"before-parameter-build.lambda.{operation}", record)
        lambda_client.meta.events.register(f"before-call.lambda.{operation}", answer)
    return name, lambda_client, boto3.client("application-autoscaling"), calls


def test_lambda_apply_sets_provisioned_concurrency_and_schedules_every_change(aws):
    from warmpool.apply import apply_lambda

    name, lambda_client, autoscaling, calls = aws
    plan = make_plan(schedule({"days": "mon-fri", "start": "08:00", "end": "18:00", "min_instances": 4},
                              {"start": "18:00", "end": "22:00", "min_instances": 1}, tz="Europe/Berlin"))
    done = apply_lambda(plan, name, "live", at=MONDAY.replace(hour=9), schedule=True,
                        lambda_client=lambda_client, autoscaling_client=autoscaling)
    assert done.instances == 4  # Monday 10:00 in Berlin
    assert calls == [("PutProvisionedConcurrencyConfig", {"FunctionName": name, "Qualifier": "live",
                                                          "ProvisionedConcurrentExecutions": 4})]
    resource = f"function:{name}:live"
    target = autoscaling.describe_scalable_targets(ServiceNamespace="lambda", ResourceIds=[resource])["ScalableTargets"]
    assert [(t["ScalableDimension"], t["MinCapacity"], t["MaxCapacity"]) for t in target] == [
        ("lambda:function:ProvisionedConcurrency", 4, 4)]
    actions = autoscaling.describe_scheduled_actions(ServiceNamespace="lambda", ResourceId=resource)["ScheduledActions"]
    assert sorted((a["ScheduledActionName"], a["Schedule"], a["Timezone"], a["ScalableTargetAction"]["MinCapacity"],
                   a["ScalableTargetAction"]["MaxCapacity"]) for a in actions) == [
        ("kiln-warmpool-daily-1800", "cron(0 18 * * ? *)", "Europe/Berlin", 1, 1),
        ("kiln-warmpool-daily-2200", "cron(0 22 * * ? *)", "Europe/Berlin", 0, 0),
        ("kiln-warmpool-mon-fri-0800", "cron(0 8 ? * MON,TUE,WED,THU,FRI *)", "Europe/Berlin", 4, 4),
    ]

    # A new plan replaces the old one's actions; 0 instances now deletes the configuration.
    calls.clear()
    evenings = make_plan(schedule({"start": "19:30", "end": "21:00", "min_instances": 2}, tz="Europe/Berlin"))
    again = apply_lambda(evenings, name, "live", at=MONDAY.replace(hour=9), schedule=True,
                         lambda_client=lambda_client, autoscaling_client=autoscaling)
    assert again.instances == 0 and calls == [("DeleteProvisionedConcurrencyConfig",
                                               {"FunctionName": name, "Qualifier": "live"})]
    assert sorted(again.deleted) == ["kiln-warmpool-daily-1800", "kiln-warmpool-daily-2200",
                                     "kiln-warmpool-mon-fri-0800"]
    actions = autoscaling.describe_scheduled_actions(ServiceNamespace="lambda", ResourceId=resource)["ScheduledActions"]
    assert sorted((a["ScheduledActionName"], a["Schedule"]) for a in actions) == [
        ("kiln-warmpool-daily-1930", "cron(30 19 * * ? *)"), ("kiln-warmpool-daily-2100", "cron(0 21 * * ? *)")]


def test_lambda_apply_command_errors_are_one_line(aws, tmp_path, capsys):
    name, _, _, _ = aws
    plan = _plan_file(tmp_path, {"start": "00:00", "end": "24:00", "min_instances": 2})
    assert main(["warmpool", "apply", "--plan", str(plan), "--lambda-function", name, "--alias", "nope"]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"kiln warmpool apply: error: Lambda function {name} alias nope: ResourceNotFound")
    assert error.count("\n") == 1
    assert main(["warmpool", "apply", "--plan", str(plan)]) == 1
    assert "give one of --lambda-function NAME or --cloud-run-service" in capsys.readouterr().err
