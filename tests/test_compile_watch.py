"""`kiln compile --watch`: SavedModel versions published to BASE/NAME/VERSION/ become servables that a
running `kiln serve` swaps in with no other step; servables appear whole (never a half-written
version); a SavedModel that cannot compile is reported and never published; object stores (moto's S3
server on loopback) work on both sides."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, free_port, stop, wait_until_up

httpx = pytest.importorskip("httpx")
COMPILE = ["--signatures", "serving_default", "--batch-sizes", "1,2", "--engine", "xla-aot"]


def watch(source: str, target: str, *args: str, log=None, **kwargs):
    command = [sys.executable, "-m", "runtime.cli", "compile", "--watch", source, target, *COMPILE, *args]
    if log is None:
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, **kwargs)
    return subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, **kwargs)


def publish(saved_model, base, name: str, version: int) -> None:
    """As a TF Serving user publishes locally: written beside, renamed into place."""
    staging = base / name / f".incoming-{version}"
    shutil.copytree(saved_model, staging)
    staging.rename(base / name / str(version))


def test_a_published_savedmodel_reaches_kiln_serve(examples, tmp_path):
    saved_model = examples["half_plus_two"].saved_model
    sources, servables = tmp_path / "saved_models", tmp_path / "servables"
    (sources / "hpt").mkdir(parents=True)
    publish(saved_model, sources, "hpt", 1)
    first = watch(str(sources), str(servables), "--once")
    assert first.returncode == 0, first.stderr
    assert (servables / "hpt" / "1" / "manifest.json").is_file()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (tmp_path / "serve.log").open("w") as serve_log, (tmp_path / "watch.log").open("w") as watch_log:
        server = subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve", "--model-repository", str(servables),
                                   "--rest-port", str(port), "--grpc-port", "0", "--host", "127.0.0.1",
                                   "--poll-seconds", "0.2"], cwd=ROOT, stdout=serve_log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "KILN_WORKERS": "1"})
        watcher = watch(str(sources), str(servables), "--poll-seconds", "0.2", log=watch_log)
    try:
        wait_until_up(server, lambda: httpx.get(f"{url}/v1/models/hpt", timeout=2).status_code == 200,
                      tmp_path / "serve.log", "kiln serve")
        publish(saved_model, sources, "hpt", 2)

        def answered_by_2() -> bool:
            answer = httpx.post(f"{url}/v1/models/hpt/versions/2:predict", json={"instances": [1.0, 3.0]}, timeout=10)
            return answer.status_code == 200 and answer.json() == {"predictions": [2.5, 3.5]}

        wait_until_up(server, answered_by_2, tmp_path / "watch.log", "version 2 served", seconds=600)
        assert sorted(p.name for p in (servables / "hpt").iterdir()) == ["1", "2"]  # no staging left behind

        # A SavedModel that cannot compile: reported, never published; version 2 serves on.
        broken = sources / "hpt" / ".incoming-3"
        broken.mkdir()
        (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
        broken.rename(sources / "hpt" / "3")
        deadline = time.monotonic() + 300
        while "compiling" not in (log := (tmp_path / "watch.log").read_text()) or "hpt/3 failed" not in log:
            assert time.monotonic() < deadline and watcher.poll() is None, log
            time.sleep(0.2)
        assert sorted(p.name for p in (servables / "hpt").iterdir()) == ["1", "2"]
        assert httpx.post(f"{url}/v1/models/hpt:predict", json={"instances": [1.0]}, timeout=10).status_code == 200
    finally:
        stop(watcher)
        stop(server)


def test_watch_between_object_stores(examples, bucket, tmp_path):
    """s3:// to s3://: the SavedModel downloaded, the servable uploaded manifest last; a broken version
    fails the one-shot run (exit 1) and leaves nothing in the target."""
    client, name = bucket
    saved_model = examples["half_plus_two"].saved_model
    for path in sorted(saved_model.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), name, f"saved_models/hpt/1/{path.relative_to(saved_model).as_posix()}")
    client.put_object(Bucket=name, Key="saved_models/hpt/2/saved_model.pb", Body=b"not a SavedModel")
    result = watch(f"s3://{name}/saved_models", f"s3://{name}/servables", "--once")
    assert result.returncode == 1, result.stderr
    assert "hpt/2 failed" in result.stderr and "published s3://" in result.stderr
    keys = [item["Key"] for item in client.list_objects_v2(Bucket=name, Prefix="servables/")["Contents"]]
    assert "servables/hpt/1/manifest.json" in keys and any(k.endswith(".so") for k in keys)
    assert not any(k.startswith("servables/hpt/2/") for k in keys)


def test_the_compile_function_on_an_s3_event(examples, bucket):
    """handlers/compile_event.handler with S3's own ObjectCreated notification (tests/events) for an
    uploaded saved_model.pb, against moto: the version is compiled into KILN_SERVABLE_BASE; a
    redelivery is skipped; other keys are ignored. The Lambda service itself is not run here."""
    import json

    from tests.conftest import run_python

    client, name = bucket
    saved_model = examples["half_plus_two"].saved_model
    for path in sorted(saved_model.rglob("*"), key=lambda p: p.name == "saved_model.pb"):  # the .pb last
        if path.is_file():
            client.upload_file(str(path), name, f"uploads/my+model/7/{path.relative_to(saved_model).as_posix()}")
    event = json.loads((ROOT / "tests" / "events" / "s3_object_created.json").read_text())
    record = event["Records"][0]
    record["s3"]["bucket"]["name"] = name
    record["s3"]["object"]["key"] = "uploads/my%2Bmodel/7/saved_model.pb"  # as S3 encodes a "+"
    other = json.loads(json.dumps(record))
    other["s3"]["object"]["key"] = "uploads/my%2Bmodel/7/variables/variables.index"
    event["Records"].append(other)
    code = ("import json, sys; from handlers.compile_event import handler; "
            "print(json.dumps(handler(json.loads(sys.argv[1]), None)))")
    env = {"KILN_SERVABLE_BASE": f"s3://{name}/servables", "KILN_COMPILE_FLAGS": " ".join(COMPILE)}
    result = run_python(code, json.dumps(event), env=env)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer == {"compiled": [f"s3://{name}/servables/my+model/7"],
                      "ignored": ["uploads/my+model/7/variables/variables.index"]}
    manifest = json.loads(client.get_object(Bucket=name, Key="servables/my+model/7/manifest.json")["Body"].read())
    assert manifest["name"] == "my+model" and manifest["version"] == 7
    again = run_python(code, json.dumps(event), env=env)  # a redelivered event: already compiled
    assert again.returncode == 0 and "compiling" not in again.stderr, again.stderr


def test_serving_a_base_of_savedmodels_says_what_to_run(examples, tmp_path):
    """A TF Serving user's base path (SavedModels, no servables): the model's status says which
    `kiln compile --watch` to run instead of only "no versions"."""
    from runtime.errors import NotFound
    from runtime.model_config import single_model
    from runtime.repository import Repository

    sources = tmp_path / "models"
    (sources / "hpt").mkdir(parents=True)
    publish(examples["half_plus_two"].saved_model, sources, "hpt", 3)
    repo = Repository(single_model("hpt", str(sources / "hpt")), poll_seconds=0)
    repo.start()
    try:
        with pytest.raises(NotFound) as raised:
            repo.status("hpt")
    finally:
        repo.stop()
    message = str(raised.value)
    assert f"{sources.as_uri()}/hpt/3 holds a SavedModel" in message
    assert f"kiln compile --watch {sources.as_uri()} SERVABLE_BASE" in message


def test_the_compile_function_on_an_eventbridge_event(monkeypatch):
    """handler() with EventBridge's Object Created (what the SAM template wires; tests/events) hands
    the uploaded version to the same compile as S3's notifications (the test above runs that one for
    real): kiln's command line is recorded here instead of compiling a second time. A key that is
    not a saved_model.pb is ignored. The Lambda service itself is not run here."""
    import json

    from handlers import compile_event

    ran = []
    monkeypatch.setattr(compile_event, "kiln", lambda argv: ran.append(argv) or 0)
    monkeypatch.setenv("KILN_SERVABLE_BASE", "s3://models/servables")
    monkeypatch.setenv("KILN_COMPILE_FLAGS", "--batch-sizes 1,8")
    event = json.loads((ROOT / "tests" / "events" / "s3_eventbridge_object_created.json").read_text())
    event["detail"]["object"]["key"] = "uploads/my model/7/saved_model.pb"  # EventBridge's keys are not form-encoded
    assert compile_event.handler(event, None) == {"compiled": ["s3://models/servables/my model/7"], "ignored": []}
    assert ran == [["compile", "--watch", "s3://amzn-s3-demo-bucket1/uploads", "s3://models/servables", "--once",
                    "--only", "my model/7", "--batch-sizes", "1,8"]]
    event["detail"]["object"]["key"] = "uploads/my model/7/variables/variables.index"
    assert compile_event.handler(event, None) == {"compiled": [], "ignored": ["uploads/my model/7/variables/variables.index"]}
    assert len(ran) == 1


def test_the_compile_service_on_an_eventarc_event(examples, gcs_bucket, gcs_endpoint, tmp_path):
    """infra/cloud_run/compile.yaml's command, functions-framework serving handlers/compile_event.py's
    cloud_event on loopback, given Eventarc's object-finalized CloudEvent (binary mode, as Eventarc
    delivers) for a saved_model.pb uploaded to a GCS emulator read with Application Default
    Credentials: the version is compiled and published; an object of another name is acknowledged
    and ignored. Eventarc itself is not run here."""
    import json

    client, name = gcs_bucket
    bucket = client.bucket(name)
    saved_model = examples["half_plus_two"].saved_model
    for path in sorted(saved_model.rglob("*"), key=lambda p: p.name == "saved_model.pb"):  # the .pb last
        if path.is_file():
            bucket.blob(f"saved_models/hpt/3/{path.relative_to(saved_model).as_posix()}").upload_from_filename(path)
    servables = tmp_path / "servables"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KILN_", "GOOGLE_"))}
    env.update(STORAGE_EMULATOR_HOST=gcs_endpoint, KILN_SERVABLE_BASE=str(servables),
               KILN_COMPILE_FLAGS=" ".join(COMPILE), PYTHONPATH=str(ROOT))
    script = os.path.join(os.path.dirname(sys.executable), "functions-framework")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "functions_framework"]
    port, log = free_port(), tmp_path / "compile.log"
    process = subprocess.Popen([*command, "--source", "handlers/compile_event.py", "--target", "cloud_event",
                                "--signature-type", "cloudevent", "--host", "127.0.0.1", "--port", str(port)],
                               cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    process.log_path = log
    url = f"http://127.0.0.1:{port}/"
    event = json.loads((ROOT / "tests" / "events" / "gcp_storage_object_finalized.json").read_text())

    def deliver(key: str):
        data = {**event["data"], "bucket": name, "name": key}
        headers = {"ce-specversion": "1.0", "ce-type": event["type"], "ce-id": key,
                   "ce-source": f"//storage.googleapis.com/projects/_/buckets/{name}", "ce-subject": f"objects/{key}",
                   "content-type": "application/json"}
        return httpx.post(url, content=json.dumps(data), headers=headers, timeout=900)

    try:
        wait_until_up(process, lambda: httpx.get(url, timeout=5).status_code > 0, log, "functions-framework")
        assert deliver("saved_models/hpt/3/variables/variables.index").status_code == 200
        assert not servables.exists()
        answer = deliver("saved_models/hpt/3/saved_model.pb")
        assert answer.status_code == 200, log.read_text()[-3000:]
        manifest = json.loads((servables / "hpt" / "3" / "manifest.json").read_text())
        assert manifest["name"] == "hpt" and manifest["version"] == 3
    finally:
        stop(process)
