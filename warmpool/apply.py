"""Applying a warm pool plan: Lambda provisioned concurrency, Cloud Run minimum instances.

Lambda (boto3, imported when used). Provisioned concurrency lives on a published version or an alias:

- Now: put_provisioned_concurrency_config(FunctionName, Qualifier=ALIAS, ProvisionedConcurrentExecutions=N)
  for the plan's window at this moment (or `at`); N = 0 deletes the configuration instead (Lambda
  refuses 0).
- The whole schedule (`schedule=True`): Application Auto Scaling is how AWS changes provisioned
  concurrency on a timetable. The alias is registered as a scalable target (service namespace lambda,
  resource function:NAME:ALIAS, dimension lambda:function:ProvisionedConcurrency) pinned at N, and
  every point where the plan changes becomes a scheduled action, cron(M H ? * DAYS *) in the plan's
  time zone, setting MinCapacity = MaxCapacity = the new count. Actions named kiln-warmpool-* that the
  new plan no longer has are deleted, so applying a plan again replaces the old one.

Cloud Run: minimum instances are the annotation minScale, on the revision template
(spec.template.metadata.annotations autoscaling.knative.dev/minScale, applied by deploying a revision)
or on the service (metadata.annotations run.googleapis.com/minScale, in effect without a new
revision; Google recommends it, and not combining the two). The file keeps the one it already uses
(the revision's where it has neither). The value is changed in the file's text, so its comments and
layout stay as they were (PyYAML, unlike ruamel.yaml, would lose comments on a round trip): the YAML
is composed to find the value's position, and the result is parsed again and checked to differ from
the original only there. Cloud Run has no timetable for minimum instances: the plan's changes are
printed as the `gcloud run services update` commands a scheduler (Cloud Scheduler, cron) would run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import yaml

from runtime.errors import ConfigError, KilnError
from warmpool.files import DAY_NAMES, Plan, show_days, show_time
from warmpool.plan import changes, instances_at

ACTION_PREFIX = "kiln-warmpool-"
LAMBDA_DIMENSION = "lambda:function:ProvisionedConcurrency"
REVISION_MIN = "autoscaling.knative.dev/minScale"
SERVICE_MIN = "run.googleapis.com/minScale"


@dataclass
class LambdaResult:
    function: str
    alias: str
    instances: int  # provisioned concurrency set now
    scheduled: list[dict] = field(default_factory=list)  # the scheduled actions put
    deleted: list[str] = field(default_factory=list)  # stale kiln-warmpool-* actions removed


def apply_lambda(
    plan: Plan,
    function: str,
    alias: str,
    *,
    at: datetime | None = None,
    schedule: bool = False,
    lambda_client=None,
    autoscaling_client=None,
) -> LambdaResult:
    """Set the alias's provisioned concurrency to the plan's count now, and with `schedule` the whole
    timetable through Application Auto Scaling (see the module's docstring)."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    count = instances_at(plan, at or datetime.now(UTC))
    result = LambdaResult(function, alias, count)
    try:
        lambda_client = lambda_client or boto3.client("lambda")
        lambda_client.get_alias(FunctionName=function, Name=alias)  # fails early, naming what is missing
        if count:
            lambda_client.put_provisioned_concurrency_config(
                FunctionName=function, Qualifier=alias, ProvisionedConcurrentExecutions=count
            )
        else:
            try:
                lambda_client.delete_provisioned_concurrency_config(FunctionName=function, Qualifier=alias)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
                    raise  # none configured is what 0 means
        if schedule:
            _schedule_lambda(
                plan,
                f"function:{function}:{alias}",
                count,
                autoscaling_client or boto3.client("application-autoscaling"),
                result,
            )
    except (ClientError, BotoCoreError) as e:
        raise KilnError(f"Lambda function {function} alias {alias}: {_message(e)}") from None
    return result


def _schedule_lambda(plan: Plan, resource: str, count: int, client, result: LambdaResult) -> None:
    target = {"ServiceNamespace": "lambda", "ResourceId": resource, "ScalableDimension": LAMBDA_DIMENSION}
    client.register_scalable_target(**target, MinCapacity=count, MaxCapacity=count)
    actions = {}
    for change in changes(plan):
        minute, hour = change.minute % 60, change.minute // 60
        days = "daily" if change.days is None else (show_days(change.days) or "").replace(",", "_")
        name = f"{ACTION_PREFIX}{days}-{hour:02d}{minute:02d}"
        actions[name] = {  # cron(minutes hours day-of-month month day-of-week year); one of the days is ?
            "Schedule": f"cron({minute} {hour} * * ? *)"
            if change.days is None
            else f"cron({minute} {hour} ? * {','.join(DAY_NAMES[d].upper() for d in change.days)} *)",
            "Timezone": plan.timezone,
            "ScalableTargetAction": {"MinCapacity": change.instances, "MaxCapacity": change.instances},
        }
    pages = client.get_paginator("describe_scheduled_actions").paginate(**target)
    for action in [action for page in pages for action in page["ScheduledActions"]]:
        name = action["ScheduledActionName"]
        if name.startswith(ACTION_PREFIX) and name not in actions:
            client.delete_scheduled_action(**target, ScheduledActionName=name)
            result.deleted.append(name)
    for name, action in actions.items():
        client.put_scheduled_action(**target, ScheduledActionName=name, **action)
        result.scheduled.append({"name": name, **action})


def _message(error) -> str:
    detail = getattr(error, "response", {}).get("Error", {})
    return f"{detail['Code']}: {detail.get('Message', '')}" if "Code" in detail else str(error)


@dataclass
class CloudRunResult:
    path: Path
    service: str
    annotation: str  # which minScale was set
    instances: int
    previous: str | None
    rewritten: bool  # True where the file had to be written whole (comments lost)
    commands: list[str] = field(default_factory=list)  # what applies it, and the plan's later changes


def apply_cloud_run(
    plan: Plan, path: Path, *, at: datetime | None = None, level: str = "auto", region: str | None = None
) -> CloudRunResult:
    """Write the plan's count now into the service YAML's minimum instances (see the docstring)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read Cloud Run service {path}: {e.strerror}") from None
    try:
        document = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not YAML: {e}") from None
    if not isinstance(document, dict) or document.get("kind") != "Service":
        raise ConfigError(f"{path} is not a Cloud Run service (kind: Service)")
    if level == "auto":
        level = "service" if SERVICE_MIN in _mapping(_mapping(document, "metadata"), "annotations") else "revision"
    if level not in ("service", "revision"):
        raise ConfigError(f"level must be auto, service or revision, got {level!r}")
    keys = ["metadata", "annotations"] if level == "service" else ["spec", "template", "metadata", "annotations"]
    annotation = SERVICE_MIN if level == "service" else REVISION_MIN
    count = instances_at(plan, at or datetime.now(UTC))

    expected = copy.deepcopy(document)
    annotations = expected
    for key in keys:
        annotations = _mapping(annotations, key, create=True)
    previous = annotations.get(annotation)
    annotations[annotation] = str(count)  # Cloud Run annotations are strings

    edited = _edit_in_place(text, root, keys, annotation, f'"{count}"')
    rewritten = edited is None or yaml.safe_load(edited) != expected
    if rewritten or edited is None:  # flow style, or blocks the file lacks: written whole
        edited = yaml.safe_dump(expected, sort_keys=False)
    path.write_text(edited)

    metadata = _mapping(document, "metadata")
    service = str(metadata.get("name", "SERVICE"))
    region = region or _mapping(metadata, "labels").get("cloud.googleapis.com/location") or "REGION"
    flag = "--min" if level == "service" else "--min-instances"
    commands = [f"gcloud run services replace {path} --region {region}"]
    for change in changes(plan):
        when = f"{show_days(change.days) or 'daily'} {show_time(change.minute)} {plan.timezone}"
        commands.append(f"# {when}: gcloud run services update {service} --region {region} {flag} {change.instances}")
    return CloudRunResult(path, service, annotation, count, previous, rewritten, commands)


def _mapping(parent: dict, key: str, *, create: bool = False) -> dict:
    """parent[key] where it is a mapping; else {} (put in place with `create`)."""
    if not isinstance(parent.get(key), dict):
        if not create:
            return {}
        parent[key] = {}
    return parent[key]


def _edit_in_place(text: str, root, keys: list[str], annotation: str, value: str) -> str | None:
    """The text with the annotation's value replaced (or its line added to a block-style mapping),
    everything else as it was; None where the path is missing or not in block style."""
    node = root
    for key in keys:
        if not isinstance(node, yaml.MappingNode) or node.flow_style:
            return None
        node = next((v for k, v in node.value if k.value == key), None)
        if node is None:
            return None
    if not isinstance(node, yaml.MappingNode) or node.flow_style or not node.value:
        return None
    for key_node, value_node in node.value:
        if key_node.value == annotation:
            return text[: value_node.start_mark.index] + value + text[value_node.end_mark.index :]
    first = node.value[0][0].start_mark
    line_start = first.index - first.column
    return text[:line_start] + " " * first.column + f"{annotation}: {value}\n" + text[line_start:]
