"""infra/: the container images, the SAM template and the Cloud Run YAMLs, checked here without
Docker, AWS or Google Cloud.

- The SAM template passes cfn-lint (which also runs the SAM transform) with no finding at all,
  informational ones included, and wires what the deployment guide promises.
- The Cloud Run service and job validate against tests/cloud_run_schema.yaml: a JSON Schema of the
  fields Cloud Run accepts, written from the Cloud Run Admin API v1 discovery document (its Service,
  Job, RevisionSpec, TaskSpec, Container, EnvVar, Probe ... schemas, and ObjectMeta's list of the
  annotations each resource takes) and the Cloud Run YAML reference
  (cloud.google.com/run/docs/reference/yaml/v1); its header says what it leaves out and why. The
  files are validated as a user deploys them, with their PROJECT_ID, REGION and BUCKET replaced.
- infra/Dockerfile's stages are carried out on this machine (ImageBuild): each image is a directory
  standing for its file system, with a fresh virtual environment for its Python, and the stages'
  own RUN, COPY, ENV and WORKDIR steps run there with the image's absolute paths mapped into it.
  TensorFlow's wheel really is downloaded (from the configured index) and cut down to
  libtensorflow_framework.so.2, and kiln's wheel is built from the .dockerignore'd context. Then
  each image runs its own command: the Lambda image's entry point against a Runtime API on
  loopback (a stand-in for the Lambda service, which cannot run here) with a direct-invocation
  event; the Cloud Run image's functions-framework command over HTTP, probed where service.yaml
  probes it; and job.yaml's command on local files. None of them has TensorFlow installed or
  loaded. Only the step that creates the images' user (useradd) is not run here.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import queue
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "Dockerfile"
TEMPLATE = INFRA / "lambda" / "template.yaml"
SERVICE = INFRA / "cloud_run" / "service.yaml"
JOB = INFRA / "cloud_run" / "job.yaml"
COMPILE = INFRA / "cloud_run" / "compile.yaml"
SCHEMA = Path(__file__).with_name("cloud_run_schema.yaml")
# What a user replaces in the Cloud Run files before deploying them, and sample values for it.
PLACEHOLDERS = {"PROJECT_ID": "my-project", "REGION": "europe-west1", "BUCKET": "my-bucket"}
# KILN_ variables the deployment files may set before a module reads them, and why.
NOT_YET_READ = {"KILN_REDIS_URL": "session state in Redis (runtime/sessions, being written)"}
FRAMEWORK_LIBRARY = "tensorflow/libtensorflow_framework.so.2"
IMAGE_SITE_PACKAGES = "/usr/local/lib/python3.11/site-packages"  # the python:3.11 images' Python
NOT_RUN_HERE = re.compile(r"^useradd ")  # would add a user to this machine


# The SAM template --------------------------------------------------------------------------------

def test_sam_template_passes_cfn_lint():
    from cfnlint.api import ManualArgs, lint_file

    findings = lint_file(TEMPLATE, config=ManualArgs(include_checks=["I"]))
    assert not findings, "\n".join(str(finding) for finding in findings)


def test_sam_template_wiring():
    from cfnlint.decode import decode

    template, errors = decode(str(TEMPLATE))
    assert not errors
    assert template["Transform"] == "AWS::Serverless-2016-10-31"
    function = template["Resources"]["Function"]
    properties = function["Properties"]
    assert properties["PackageType"] == "Image" and properties["ImageUri"] == {"Ref": "ImageUri"}
    assert function["Metadata"]["DockerBuildTarget"] == "lambda"
    assert (ROOT / "infra" / "lambda" / function["Metadata"]["DockerContext"] / function["Metadata"]["Dockerfile"]
            ).resolve() == DOCKERFILE
    assert properties["MemorySize"] == {"Ref": "MemorySize"} and properties["Timeout"] == {"Ref": "Timeout"}
    assert properties["Architectures"] == [{"Ref": "Architecture"}]
    assert template["Parameters"]["Architecture"]["AllowedValues"] == ["x86_64", "arm64"]
    assert template["Parameters"]["Architecture"]["Default"] == "x86_64"
    assert properties["AutoPublishAlias"] == "live"
    condition, provisioned, _ = properties["ProvisionedConcurrencyConfig"]["Fn::If"]
    assert provisioned == {"ProvisionedConcurrentExecutions": {"Ref": "ProvisionedConcurrency"}}
    assert template["Parameters"]["FunctionUrlAuthType"]["Default"] == "AWS_IAM"
    assert properties["FunctionUrlConfig"]["AuthType"] == {"Ref": "FunctionUrlAuthType"}

    events = properties["Events"]
    assert events["Queue"]["Type"] == "SQS"
    assert events["Queue"]["Properties"]["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert events["Objects"]["Type"] == "S3"
    bucket = events["Objects"]["Properties"]["Bucket"]["Ref"]
    assert template["Resources"][bucket]["Type"] == "AWS::S3::Bucket"  # SAM: in the same template
    assert events["Objects"]["Properties"]["Filter"]["S3Key"]["Rules"] == [
        {"Name": "prefix", "Value": {"Ref": "InputPrefix"}}]

    variables = properties["Environment"]["Variables"]
    assert {"KILN_MODEL_REPOSITORY", "KILN_MODEL_NAME", "KILN_OUTPUT_PREFIX", "KILN_REDIS_URL"} <= set(variables)
    # Secrets come from Secrets Manager at deploy time, never from a plain parameter's value.
    for name in ("KILN_API_KEYS", "KILN_SESSION_KEY"):
        _, secret, _ = variables[name]["Fn::If"]
        assert secret["Fn::Sub"].startswith("{{resolve:secretsmanager:")
    # Sessions in Redis need one key on every instance (Kiln refuses to start without it): the template
    # refuses a RedisUrl without a SessionKeySecret.
    rule = template["Rules"]["SessionsNeedAKey"]
    assert rule["RuleCondition"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "RedisUrl"}, ""]}]}
    assert rule["Assertions"][0]["Assert"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "SessionKeySecret"}, ""]}]}
    policies = {name for policy in properties["Policies"] for name in policy}
    assert {"S3ReadPolicy", "S3CrudPolicy"} <= policies
    assert {"FunctionUrl", "LiveAlias", "QueueUrl"} <= set(template["Outputs"])


# The Cloud Run YAMLs -----------------------------------------------------------------------------

def cloud_run_document(path: Path) -> dict:
    """The file as deployed: placeholders replaced, none left."""
    text = path.read_text()
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    document = yaml.safe_load(text)

    def values(node, key=None):
        if isinstance(node, dict):
            for name, child in node.items():
                yield from values(child, name)
        elif isinstance(node, list):
            for child in node:
                yield from values(child, key)
        elif isinstance(node, str) and key != "name":  # variables' names are capitals
            yield node

    assert not [value for value in values(document) if re.search(r"\b[A-Z][A-Z0-9_]{3,}\b", value)], path
    return document


def cloud_run_errors(document: dict) -> list[str]:
    """What Cloud Run would refuse in a service or job: the schema's errors, then the rules that
    span fields (the discovery document's words: a probe's timeout below its period, parallelism at
    most the task count; a secret-backed variable's name unique in its container)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(yaml.safe_load(SCHEMA.read_text()))
    errors = [f"{'.'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
              for error in validator.iter_errors(document)]
    spec = document.get("spec", {}).get("template", {}).get("spec", {})
    if document.get("kind") == "Job":
        if spec.get("parallelism", 0) > spec.get("taskCount", 1):
            errors.append("parallelism exceeds taskCount")
        spec = spec.get("template", {}).get("spec", {})
    for container in spec.get("containers", []):
        for name in ("startupProbe", "livenessProbe"):
            probe = container.get(name, {})
            if probe.get("timeoutSeconds", 1) >= probe.get("periodSeconds", 10):
                errors.append(f"{name}: timeoutSeconds must be below periodSeconds")
        names = [variable.get("name") for variable in container.get("env", [])]
        if len(names) != len(set(names)):
            errors.append(f"environment variables set twice: {names}")
    return errors


@pytest.mark.parametrize("path", [SERVICE, JOB, COMPILE], ids=["service", "job", "compile"])
def test_cloud_run_yaml_has_only_fields_cloud_run_accepts(path):
    assert cloud_run_errors(cloud_run_document(path)) == []


def _container(document: dict) -> dict:
    spec = document["spec"]["template"]["spec"]
    return (spec["template"]["spec"] if document["kind"] == "Job" else spec)["containers"][0]


_DELETE = object()


def _set(document: dict, path: str, value) -> dict:
    """A copy with the value at a dotted path ("container.image": in the first container)."""
    document = copy.deepcopy(document)
    *parents, last = path.split(".")
    target = document
    for part in parents:
        target = _container(document) if part == "container" else target[int(part) if part.isdigit() else part]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return document


MUTATIONS = [
    (SERVICE, "container.containerConcurency", 80, "a misspelt field"),
    (SERVICE, "spec.template.spec.containerConcurrency", 1001, "concurrency above 1000"),
    (SERVICE, "spec.template.spec.timeoutSeconds", 3601, "a request timeout above an hour"),
    (SERVICE, "container.resources.limits.memory", "4GB", "memory not as Mi or Gi"),
    (SERVICE, "container.resources.limits.cpu", "9", "more than 8 CPUs"),
    (SERVICE, "container.resources.limits.cpu", "0.05", "less than 0.08 CPU"),
    (SERVICE, "container.resources.limits.disk", "1Gi", "a resource Cloud Run has no limit for"),
    (SERVICE, "spec.template.metadata.annotations.autoscaling.knative.dev/minScale", 1, "an annotation not a string"),
    (SERVICE, "spec.template.metadata.annotations.run.googleapis.com/minInstances", "1", "an unknown Cloud Run annotation"),
    (SERVICE, "container.readinessProbe", {"httpGet": {"path": "/"}}, "a field Cloud Run does not support"),
    (SERVICE, "container.image", _DELETE, "no image"),
    (SERVICE, "container.startupProbe.periodSeconds", 300, "a startup probe period above 240 s"),
    (SERVICE, "container.startupProbe.timeoutSeconds", 2, "a probe timeout not below its period"),
    (SERVICE, "container.env", [{"name": "PORT", "value": "9000"}], "a variable Cloud Run sets itself"),
    (SERVICE, "container.env", [{"name": "A", "value": "1", "valueFrom": {"secretKeyRef": {"name": "s", "key": "latest"}}}],
     "a value and a secret at once"),
    (SERVICE, "metadata.name", "Kiln_Service", "a name Cloud Run refuses"),
    (JOB, "spec.template.spec.taskCount", 0, "no tasks"),
    (JOB, "spec.template.spec.parallelism", 9, "parallelism above the task count"),
    (JOB, "container.env", [{"name": "CLOUD_RUN_TASK_INDEX", "value": "0"}], "the task index, which Cloud Run sets"),
    (JOB, "spec.template.spec.template.spec.containerConcurrency", 10, "a service field in a job"),
    (JOB, "spec.template.spec.template.spec.maxRetries", 11, "more than 10 retries"),
]


@pytest.mark.parametrize("path, where, value, what", MUTATIONS, ids=[m[3] for m in MUTATIONS])
def test_cloud_run_check_refuses(path, where, value, what):
    document = cloud_run_document(path)
    if "annotations." in where:  # annotation keys hold dots themselves
        head, _, key = where.partition("annotations.")
        mutated = copy.deepcopy(document)
        annotations = mutated
        for part in head.strip(".").split("."):
            annotations = annotations[part]
        annotations["annotations"][key] = value
    else:
        mutated = _set(document, where, value)
    assert cloud_run_errors(mutated), f"{what} was accepted"


def test_cloud_run_service_and_job_fit_the_image():
    service, job = cloud_run_document(SERVICE), cloud_run_document(JOB)
    assert _container(service)["image"] == _container(job)["image"]  # one image, two commands
    assert _container(job)["command"] == ["python", "-m", "handlers.cloud_run_job"]
    assert "command" not in _container(service)  # the image's CMD: functions-framework
    from runtime.app import __doc__ as routes

    for probe, path in (("startupProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
        assert _container(service)[probe]["httpGet"]["path"] == path and path in routes


def test_compile_on_upload_is_wired():
    """The SAM template's compile function (only with SavedModelPrefix) and the Cloud Run compile
    service run handlers/compile_event.py's entry points, from the compile image, on the uploads of
    saved_model.pb, publishing where the serving side reads."""
    from cfnlint.decode import decode

    template, errors = decode(str(TEMPLATE))
    assert not errors
    function = template["Resources"]["CompileFunction"]
    assert function["Condition"] == "CompilesOnUpload"
    assert template["Conditions"]["CompilesOnUpload"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "SavedModelPrefix"}, ""]}]}
    assert function["Metadata"]["DockerBuildTarget"] == "compile"
    properties = function["Properties"]
    assert properties["ImageUri"] == {"Ref": "CompileImageUri"}
    variables = properties["Environment"]["Variables"]
    assert variables["KILN_SERVABLE_BASE"] == {"Fn::Sub": "s3://${ModelBucket}/${ModelPrefix}"}
    assert template["Resources"]["Function"]["Properties"]["Environment"]["Variables"]["KILN_MODEL_REPOSITORY"] == \
        {"Fn::Sub": "s3://${ModelBucket}/${ModelPrefix}"}
    event = properties["Events"]["SavedModelUploaded"]
    assert event["Type"] == "EventBridgeRule"
    pattern = event["Properties"]["Pattern"]
    assert pattern["source"] == ["aws.s3"] and pattern["detail-type"] == ["Object Created"]
    assert pattern["detail"]["object"]["key"] == [{"wildcard": {"Fn::Sub": "${SavedModelPrefix}/*/saved_model.pb"}}]
    dockerfile = DOCKERFILE.read_text()
    assert 'CMD ["handlers.compile_event.handler"]' in dockerfile.split("AS compile", 1)[1]

    container = _container(cloud_run_document(COMPILE))
    assert container["image"].endswith("/kiln-compile:latest")
    command = container["command"]
    assert command[command.index("--source") + 1] == "handlers/compile_event.py"
    assert command[command.index("--target") + 1] == "cloud_event"
    assert command[command.index("--signature-type") + 1] == "cloudevent"
    env = {variable["name"]: variable.get("value") for variable in container["env"]}
    serving = {variable["name"]: variable.get("value") for variable in _container(cloud_run_document(SERVICE))["env"]}
    assert env["KILN_SERVABLE_BASE"] == serving["KILN_MODEL_REPOSITORY"]  # published where the service reads


def test_kiln_variables_in_infra_are_read():
    """Every KILN_ variable the deployment files set is one Kiln reads (a typo would be ignored)."""
    sources = "".join(path.read_text() for folder in ("runtime", "handlers") for path in (ROOT / folder).rglob("*.py"))
    names = set()
    for path in (DOCKERFILE, TEMPLATE, SERVICE, JOB, COMPILE):
        names |= set(re.findall(r"\bKILN_[A-Z0-9_]+", path.read_text()))
    unread = sorted(name for name in names if f'"{name}"' not in sources and f"{name} " not in sources
                    and name not in NOT_YET_READ)
    assert not unread


# The Dockerfile ----------------------------------------------------------------------------------

@dataclass
class Stage:
    name: str
    base: str  # an image, or an earlier stage
    steps: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)


def read_dockerfile(path: Path = DOCKERFILE) -> tuple[dict[str, str], dict[str, Stage]]:
    """The global ARG defaults and the stages by name (continuation lines joined, comments dropped)."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage = None
    for line in filter(None, map(str.strip, text.splitlines())):
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            base, name = re.split(r"\s+AS\s+", rest, flags=re.IGNORECASE)
            stage = stages[name] = Stage(name, base)
        elif stage is None:
            assert instruction == "ARG", line
            key, _, value = rest.partition("=")
            args[key] = value
        else:
            stage.steps.append((instruction, rest.strip()))
    return args, stages


def test_dockerfile_pins_match_pyproject():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    args, stages = read_dockerfile()
    pins = dict(step[1].split("=", 1) for step in stages["framework"].steps if step[0] == "ARG")
    tensorflow = pins["TENSORFLOW"]
    assert tensorflow in extras["compile"], "the image's framework library must be the compiler's TensorFlow's"
    # arm64 images take it from tensorflow's aarch64 wheel (tensorflow-cpu has none), of the same version.
    assert pins["TENSORFLOW_AARCH64"] == tensorflow.replace("tensorflow-cpu==", "tensorflow==")
    generator = next(spec for spec in extras["dev"] if spec.startswith("grpcio-tools"))
    assert f'"{generator}"' in dict(stages["wheel"].steps)["RUN"]
    # The wheel holds the one file the framework stage extracts (checked on the installed copy).
    assert FRAMEWORK_LIBRARY in {str(file) for file in importlib.metadata.files("tensorflow-cpu")}
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    assert stages["lambda"].base == stages["cloud-run"].base == "runtime"


def docker_context(root: Path = ROOT) -> list[str]:
    """The files `docker build` sends from root after .dockerignore: its rules in order, the last
    that matches deciding, a rule matching a path or any folder above it, `!` taking back in."""
    rules = []
    for line in (root / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            pattern = line.removeprefix("!").strip("/")
            regex = "".join("(.*/)?" if part == "**/" else ".*" if part == "**" else "[^/]*" if part == "*"
                            else "[^/]" if part == "?" else re.escape(part)
                            for part in re.split(r"(\*\*/|\*\*|\*|\?)", pattern))
            rules.append((line.startswith("!"), pattern, re.compile(regex)))

    def excluded(relative: str) -> bool:
        parts = relative.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        verdict = False
        for include, _, regex in rules:
            if any(regex.fullmatch(prefix) for prefix in prefixes):
                verdict = not include
        return verdict

    def reaches_into(folder: str) -> bool:  # a `!` rule may take back something inside it
        return any(include and (pattern.startswith(f"{folder}/") or "*" in pattern) for include, pattern, _ in rules)

    files = []
    for folder, subfolders, names in os.walk(root):
        relative = Path(folder).relative_to(root).as_posix()
        paths = {name: name if relative == "." else f"{relative}/{name}" for name in subfolders + names}
        subfolders[:] = [name for name in subfolders if not excluded(paths[name]) or reaches_into(paths[name])]
        files += [paths[name] for name in names if not excluded(paths[name])]
    return sorted(files)


def test_docker_context_holds_the_sources_only():
    context = docker_context()
    tops = {path.split("/")[0] for path in context}
    assert tops == {"pyproject.toml", "README.md", "runtime", "handlers", "warmpool"}
    assert "runtime/protos/model_config.proto" in context and "handlers/__init__.py" in context
    assert not [path for path in context if "__pycache__" in path or path.endswith(".so")
                or path.startswith("runtime/protos/generated/")]


class Image:
    """One image built on this machine: ROOT/fs stands for its file system and ROOT/venv, a fresh
    virtual environment, for its Python (/usr/local). Absolute paths in its steps are mapped there."""

    def __init__(self, root: Path):
        self.root = root
        self.venv = root / "venv"
        (root / "fs").mkdir(parents=True)
        subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True)
        self.site_packages = self.venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
        self.env: dict[str, str] = {}
        self.workdir = "/"
        self.entrypoint: list[str] = []
        self.cmd: list[str] = []
        self.user: str | None = None
        self.exposed: list[str] = []

    def host(self, path: str) -> Path:
        """Where the image's absolute path lies on this machine."""
        if path == IMAGE_SITE_PACKAGES or path.startswith(IMAGE_SITE_PACKAGES + "/"):
            return self.site_packages / path[len(IMAGE_SITE_PACKAGES):].lstrip("/")
        return self.root / "fs" / path.lstrip("/")

    def mapped(self, text: str) -> str:
        """Text of the image's (a command, a value) with its absolute paths mapped here."""
        return re.sub(r"(?<![\w.~-])/[\w./*-]*", lambda match: str(self.host(match.group(0))), text)

    def environ(self, **extra: str) -> dict[str, str]:
        environ = {name: value for name, value in os.environ.items()
                   if name not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME") and not name.startswith("KILN_")}
        return {**environ, **self.env, "PATH": f"{self.venv / 'bin'}:{os.environ['PATH']}", **extra}

    def argv(self, words: list[str]) -> list[str]:
        """A command of the image (its ENTRYPOINT and CMD, or a job's command) as run here."""
        program = self.venv / "bin" / words[0]
        return [str(program) if program.exists() else words[0], *(self.mapped(word) for word in words[1:])]


class ImageBuild:
    """infra/Dockerfile's stages carried out here: `image(name)` builds a stage and the stages it
    takes files from; a stage built FROM another continues in that one's image."""

    def __init__(self, root: Path):
        self.root = root
        self.args, self.stages = read_dockerfile()
        self.images: dict[str, Image] = {}
        self.skipped: list[str] = []
        self.seconds: dict[str, float] = {}

    def image(self, name: str) -> Image:
        if name not in self.images:
            started = time.perf_counter()
            chain = [self.stages[name]]
            while chain[0].base in self.stages:
                chain.insert(0, self.stages[chain[0].base])
            image = Image(self.root / name)
            for stage in chain:
                for instruction, arguments in stage.steps:
                    self.step(image, instruction, arguments)
            self.images[name] = image
            self.seconds[name] = round(time.perf_counter() - started, 1)
        return self.images[name]

    def step(self, image: Image, instruction: str, arguments: str) -> None:
        if instruction == "ARG":
            key, _, value = arguments.partition("=")
            image.env.setdefault(key, value)
        elif instruction == "ENV":
            for pair in shlex.split(arguments):
                key, _, value = pair.partition("=")
                image.env[key] = image.mapped(value)
        elif instruction == "WORKDIR":
            image.workdir = arguments
            image.host(arguments).mkdir(parents=True, exist_ok=True)
        elif instruction == "COPY":
            self.copy(image, shlex.split(arguments))
        elif instruction == "RUN":
            self.run(image, arguments)
        elif instruction in ("ENTRYPOINT", "CMD"):
            setattr(image, instruction.lower(), json.loads(arguments))
        elif instruction == "USER":
            image.user = arguments
        elif instruction == "EXPOSE":
            image.exposed = arguments.split()
        else:
            raise AssertionError(f"{instruction} is not carried out here: teach ImageBuild.step")

    def copy(self, image: Image, words: list[str]) -> None:
        source_stage = next((word.split("=", 1)[1] for word in words if word.startswith("--from=")), None)
        *sources, destination = [word for word in words if not word.startswith("--")]
        if source_stage is None:  # the build context
            assert sources == ["."], "copy the context whole"
            target = image.host(image.workdir if destination == "." else destination)
            for relative in docker_context():
                (target / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / relative, target / relative)
            return
        other = self.image(source_stage)
        for source in sources:
            target = image.host(destination)
            if other.host(source).is_dir():  # its contents, into the destination
                shutil.copytree(other.host(source), target, dirs_exist_ok=True)
                continue
            if destination.endswith("/"):
                target = target / Path(source).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(other.host(source), target)

    def run(self, image: Image, arguments: str) -> None:
        if NOT_RUN_HERE.match(arguments):
            self.skipped.append(arguments)
            return
        done = subprocess.run(["/bin/sh", "-c", image.mapped(arguments)], cwd=image.host(image.workdir),
                              env=image.environ(), capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"RUN {arguments}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def images():
    """The Lambda and Cloud Run images, built here (minutes: two wheels and three installs); they
    are deleted afterwards."""
    with tempfile.TemporaryDirectory(prefix="kiln-images-") as folder:
        build = ImageBuild(Path(folder))
        for target in ("lambda", "cloud-run"):
            build.image(target)
        sizes = {target: sum(path.stat().st_size for path in build.images[target].site_packages.rglob("*")
                             if path.is_file()) >> 20 for target in ("lambda", "cloud-run")}
        print(f"\nbuilt in seconds: {build.seconds}; site-packages in MiB: {sizes}")
        assert build.skipped == ["useradd --system --uid 10001 kiln"]
        yield build


@pytest.fixture(scope="module")
def model_repository(digits, tmp_path_factory) -> Path:
    """A repository with the digits servable alone."""
    root = tmp_path_factory.mktemp("infra-models")
    shutil.copytree(digits.servable, root / "digits" / "1")
    return root


def digit_image(value: float = 0.5) -> list:
    return [[[value] for _ in range(28)] for _ in range(28)]


def _is_probabilities(row) -> bool:
    return len(row) == 10 and abs(sum(row) - 1) < 1e-4 and all(0 <= p <= 1 for p in row)


def assert_without_tensorflow(image: Image, pid: int | None = None) -> None:
    """TensorFlow is not installed in the image; the process (if given) mapped no part of it but
    the framework library, from where the image keeps it."""
    probe = subprocess.run([str(image.venv / "bin" / "python"), "-c",
                            "import importlib.util; print(importlib.util.find_spec('tensorflow'))"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "None"
    if pid is not None:
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "/tensorflow/" not in maps
        assert image.env["KILN_TF_FRAMEWORK_LIBRARY"] in maps


class LambdaRuntimeApi(ThreadingHTTPServer):
    """The Lambda Runtime API (2018-06-01) on loopback: the part of the Lambda service that hands an
    execution environment its events and takes its answers. It stands in for the Lambda service,
    which cannot run here. Events are handed out in order; then /next waits, as Lambda's does."""

    daemon_threads = True
    FUNCTION_ARN = "arn:aws:lambda:us-east-1:123456789012:function:kiln:live"

    def __init__(self, events: list):
        super().__init__(("127.0.0.1", 0), _RuntimeApiHandler)
        self.events: queue.Queue = queue.Queue()
        for event in events:
            self.events.put(event)
        self.answers: queue.Queue = queue.Queue()  # (path's last part: response or error, body)

    def handle_error(self, request, client_address):
        pass  # the environment is killed at the end while it waits on /next

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class _RuntimeApiHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if not self.path.endswith("/runtime/invocation/next"):
            return self._send(404, {"errorMessage": f"no route {self.path}"})
        event = self.server.events.get()
        if event is None:
            return self._send(500, {"errorMessage": "shutting down"})
        self._send(200, event, {"Lambda-Runtime-Aws-Request-Id": str(uuid.uuid4()),
                                "Lambda-Runtime-Deadline-Ms": str(int(time.time() * 1000) + 60_000),
                                "Lambda-Runtime-Invoked-Function-Arn": LambdaRuntimeApi.FUNCTION_ARN})

    def do_POST(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while size := int(self.rfile.readline().strip() or b"0", 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.answers.put((self.path.rsplit("/", 1)[-1], body))
        self._send(202, {"status": "OK"})

    def _send(self, status: int, body, headers: dict | None = None):
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                            **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_lambda_image_answers_a_direct_invocation(images, model_repository, tmp_path):
    image = images.image("lambda")
    assert image.entrypoint == ["python", "-m", "awslambdaric"] and image.cmd == ["handlers.aws_lambda.handler"]
    api = LambdaRuntimeApi([{"instances": [digit_image(0.5), digit_image(0.0)]}])
    threading.Thread(target=api.serve_forever, daemon=True).start()
    task_root = tmp_path / "task"
    task_root.mkdir()
    environ = image.environ(AWS_LAMBDA_RUNTIME_API=api.address, AWS_LAMBDA_FUNCTION_NAME="kiln",
                            AWS_LAMBDA_FUNCTION_VERSION="1", AWS_LAMBDA_FUNCTION_MEMORY_SIZE="2048",
                            AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1", LAMBDA_TASK_ROOT=str(task_root),
                            _HANDLER=image.cmd[0], KILN_MODEL_REPOSITORY=str(model_repository),
                            KILN_MODEL_NAME="digits", POWERTOOLS_SERVICE_NAME="kiln")
    log = tmp_path / "lambda.log"
    with log.open("w") as output:
        process = subprocess.Popen(image.argv(image.entrypoint + image.cmd), cwd=task_root, env=environ,
                                   stdout=output, stderr=subprocess.STDOUT)
    try:
        try:
            kind, body = api.answers.get(timeout=180)
        except queue.Empty:
            pytest.fail(f"no answer from the Lambda image: {log.read_text()[-4000:]}")
        assert kind == "response", f"{kind}: {body[:2000]!r}\n{log.read_text()[-4000:]}"
        answer = json.loads(body)
        assert answer["model"] == "digits" and len(answer["predictions"]) == 2
        assert all(_is_probabilities(row) for row in answer["predictions"]), answer
        assert_without_tensorflow(image, process.pid)
    finally:
        _stop(process)
        api.events.put(None)
        api.shutdown()


def _local_env(container: dict, places: dict[str, Path]) -> dict[str, str]:
    """A Cloud Run container's plain environment with its bucket URLs put on this machine (secret
    ones are left out: the HMAC key and API keys are for Cloud Storage and callers)."""
    environ = {}
    for variable in container.get("env", []):
        if "value" in variable:
            value = variable["value"]
            for url, place in places.items():
                value = value.replace(url, str(place))
            environ[variable["name"]] = value
    return environ


@pytest.mark.slow
def test_cloud_run_image_serves_behind_its_probes(images, model_repository, tmp_path):
    import httpx

    image = images.image("cloud-run")
    assert image.user == "10001" and not image.entrypoint
    container = _container(cloud_run_document(SERVICE))
    port = free_port()
    environ = image.environ(PORT=str(port), HOST="127.0.0.1",
                            **_local_env(container, {"gs://my-bucket/servables": model_repository,
                                                     "gs://my-bucket/scored": tmp_path / "scored"}))
    log = tmp_path / "cloud_run.log"
    with log.open("w") as output:
        process = subprocess.Popen(image.argv(image.cmd), cwd=tmp_path, env=environ, stdout=output,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_200(url + container["startupProbe"]["httpGet"]["path"], process, log)  # as the startup probe does
        assert httpx.get(url + container["livenessProbe"]["httpGet"]["path"], timeout=5).status_code == 200
        response = httpx.post(f"{url}/v1/models/digits:predict", json={"instances": [digit_image()]}, timeout=30)
        assert response.status_code == 200, response.text
        assert _is_probabilities(response.json()["predictions"][0])
        assert_without_tensorflow(image)
    finally:
        _stop(process)


@pytest.mark.slow
def test_serve_image_takes_tensorflow_serving_arguments(images, model_repository, tmp_path):
    """The serve target as `docker run -e MODEL_NAME=digits -v ...:/models/digits kiln-serve` runs it,
    with ports given as arguments after the image's own (here: free ones; the last flag wins)."""
    import httpx

    image = images.image("serve")
    assert images.skipped == ["useradd --system --uid 10001 kiln"] * 2 and image.user == "10001"
    assert image.exposed == ["8500", "8501"]
    assert image.entrypoint == ["kiln", "serve", "--port=8500", "--rest_api_port=8501"] and not image.cmd
    shutil.copytree(model_repository / "digits", image.host("/models/digits"))
    rest, grpc_port = free_port(), free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as output:
        process = subprocess.Popen(image.argv([*image.entrypoint, f"--port={grpc_port}", f"--rest_api_port={rest}",
                                               "--host=127.0.0.1"]),
                                   cwd=tmp_path, env=image.environ(MODEL_NAME="digits"), stdout=output,
                                   stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{rest}"
    try:
        _wait_for_200(f"{url}/v1/models/digits", process, log)
        response = httpx.post(f"{url}/v1/models/digits:predict", json={"instances": [digit_image()]}, timeout=30)
        assert response.status_code == 200, response.text
        assert _is_probabilities(response.json()["predictions"][0])
        assert_without_tensorflow(image)
    finally:
        _stop(process)


@pytest.mark.slow
def test_cloud_run_image_runs_the_job(images, model_repository, tmp_path):
    image = images.image("cloud-run")
    container = _container(cloud_run_document(JOB))
    incoming, scored = tmp_path / "incoming", tmp_path / "scored"
    incoming.mkdir()
    (incoming / "rows.jsonl").write_text("".join(json.dumps(digit_image(v)) + "\n" for v in (0.0, 0.5, 1.0)))
    places = {"gs://my-bucket/servables": model_repository, "gs://my-bucket/scored": scored,
              "gs://my-bucket/incoming/": f"{incoming}/"}
    args = [str(places.get(arg, arg)) for arg in container["args"]]
    environ = image.environ(CLOUD_RUN_TASK_INDEX="0", CLOUD_RUN_TASK_COUNT="1", **_local_env(container, places))
    done = subprocess.run(image.argv(container["command"]) + args, cwd=tmp_path, env=environ,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [part] = scored.rglob("part-*.jsonl")
    rows = [json.loads(line) for line in part.read_text().splitlines()]
    assert [row["row"] for row in rows] == [0, 1, 2]
    assert all(_is_probabilities(row["predictions"]) for row in rows)


def _wait_for_200(url: str, process: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    """Poll url until it answers 200; fail with the server's log if it exits or the time runs out."""
    import httpx

    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
        time.sleep(0.5)
