"""Warm-up before a version is served: TensorFlow Serving's warm-up file (a TFRecord of
PredictionLog written here by TensorFlow itself) and Kiln's JSON form replayed at every bucket,
readiness only after warm-up, and a failing warm-up failing the load while the old version serves."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import orjson
import pytest

import runtime.repository as repository_module
from runtime.engines.base import Engine
from runtime.errors import ServableError
from runtime.manifest import describe_files, read_manifest
from runtime.model_config import ModelConfig, ModelConfigList
from runtime.repository import Repository
from runtime.servable_cache import ServableCache
from runtime.version_policy import State
from runtime.warmup import WARMUP_DIR, read_records, warm_up, warmup_requests

tf = pytest.importorskip("tensorflow")
prediction_log_pb2 = pytest.importorskip("tensorflow_serving.apis.prediction_log_pb2")
from tensorflow_serving.apis import classification_pb2, predict_pb2  # noqa: E402


def with_warmup(servable, directory, name: str, data: bytes):
    """A copy of a servable carrying a warm-up file, its manifest listing it (as kiln compile
    writes it from a SavedModel's assets.extra)."""
    shutil.copytree(servable, directory)
    (directory / WARMUP_DIR).mkdir(exist_ok=True)
    (directory / WARMUP_DIR / name).write_bytes(data)
    manifest = read_manifest(directory)
    manifest.replace(files=describe_files(directory)).write(directory)
    return directory


def tfrecord(path, logs) -> bytes:
    with tf.io.TFRecordWriter(str(path)) as writer:
        for log in logs:
            writer.write(log.SerializeToString())
    return path.read_bytes()


def predict_log(model: str, **inputs) -> prediction_log_pb2.PredictionLog:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))


def classify_log() -> prediction_log_pb2.PredictionLog:
    example = tf.train.Example(features=tf.train.Features(feature={
        "x": tf.train.Feature(float_list=tf.train.FloatList(value=[3.0]))}))
    request = classification_pb2.ClassificationRequest()
    request.model_spec.signature_name = "classify_x_to_y"
    request.input.example_list.examples.append(example)
    return prediction_log_pb2.PredictionLog(classify_log=prediction_log_pb2.ClassifyLog(request=request))


def test_tensorflow_written_warmup_records_are_replayed_at_every_bucket(examples, tmp_path, monkeypatch):
    data = tfrecord(tmp_path / "requests", [predict_log("half_plus_two", x=np.array([1.0, 2.0, 3.0], np.float32)),
                                            classify_log()])
    servable = with_warmup(examples["half_plus_two"].servable, tmp_path / "servable", "tf_serving_warmup_requests", data)
    assert len(list(read_records(servable / WARMUP_DIR / "tf_serving_warmup_requests"))) == 2
    (predict, xs), (classify, examples_in) = warmup_requests(servable)
    assert predict == "serving_default" and xs["x"].tolist() == [1.0, 2.0, 3.0]
    assert classify == "classify_x_to_y" and len(examples_in["inputs"]) == 1
    engine = Engine.open(servable)
    seen = []
    original = engine.run
    monkeypatch.setattr(engine, "run", lambda key, inputs: seen.append((key, {n: a.copy() for n, a in inputs.items()}))
                        or original(key, inputs))
    warm_up(engine, iterations=2)
    buckets = engine.manifest.batch_sizes
    replayed = [inputs["x"] for key, inputs in seen if key == "serving_default"]
    assert [len(x) for x in replayed] == list(buckets) * 2  # every bucket, twice
    assert replayed[-1][:4].tolist() == [1.0, 2.0, 3.0, 1.0]  # the request's rows repeated to fill it
    assert sum(key == "classify_x_to_y" for key, _ in seen) == 2 * len(buckets)
    # Signatures no request covers still get synthesized inputs at every bucket (string ones are skipped).
    assert {key for key, _ in seen} >= {"serving_default", "classify_x_to_y"}
    engine.close()


def test_kiln_json_warmup(examples, tmp_path):
    body = orjson.dumps([{"instances": [[[[0.5]] * 28] * 28]}])
    servable = with_warmup(examples["digits"].servable, tmp_path / "servable", "kiln_warmup.json", body)
    ((key, inputs),) = warmup_requests(servable)
    assert key == "serving_default" and inputs["images"].shape == (1, 28, 28, 1)
    engine = Engine.open(servable)
    assert warm_up(engine) == len(engine.manifest.batch_sizes)
    engine.close()


def recording(engine, monkeypatch) -> list:
    """(signature, rows of its first input) of every call the engine makes from now on."""
    seen = []
    original = engine.run
    monkeypatch.setattr(engine, "run", lambda key, inputs: seen.append((key, len(next(iter(inputs.values())))))
                        or original(key, inputs))
    return seen


def test_first_depth_replays_the_servables_requests_as_they_are(examples, tmp_path, monkeypatch):
    data = tfrecord(tmp_path / "requests", [predict_log("half_plus_two", x=np.array([1.0, 2.0, 3.0], np.float32)),
                                            classify_log()])
    servable = with_warmup(examples["half_plus_two"].servable, tmp_path / "servable", "tf_serving_warmup_requests",
                           data)
    engine = Engine.open(servable)
    seen = recording(engine, monkeypatch)
    assert warm_up(engine, iterations=2, depth="first") == 4
    assert seen == [("serving_default", 3)] * 2 + [("classify_x_to_y", 1)] * 2  # nothing else, no bucket sizes
    engine.close()


def test_first_depth_without_requests_is_one_call_at_the_smallest_bucket(examples, monkeypatch):
    engine = Engine.open(examples["digits"].servable)
    seen = recording(engine, monkeypatch)
    assert warm_up(engine, depth="first") == 1
    assert seen == [("serving_default", engine.manifest.batch_sizes[0])]
    engine.close()


def test_the_repository_warms_to_the_depth_it_is_given(examples, tmp_path, monkeypatch):
    depths = []
    monkeypatch.setattr(repository_module, "warm_up", lambda engine, iterations, depth: depths.append(depth))
    for depth in ("first", "all"):
        repository = repository_of(tmp_path / depth, (1, examples["half_plus_two"].servable))
        if depth == "all":
            repository.warmup = depth
        repository.start()
        assert repository.is_available("half_plus_two")
        repository.stop()
    assert depths == ["first", "all"]  # "first" by default


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:-3], "truncated"),
    (lambda data: data[:20] + bytes([data[20] ^ 1]) + data[21:], "checksum does not match"),
    (lambda data: b"\x05" + data[1:], "checksum does not match"),
])
def test_a_damaged_warmup_file_is_refused(examples, tmp_path, damage, message):
    data = tfrecord(tmp_path / "requests", [predict_log("half_plus_two", x=np.array([1.0], np.float32))])
    servable = with_warmup(examples["half_plus_two"].servable, tmp_path / "servable", "tf_serving_warmup_requests",
                           damage(data))
    with pytest.raises(ServableError, match=message):
        warmup_requests(servable)


def repository_of(tmp_path, *versions) -> Repository:
    base = tmp_path / "models" / "half_plus_two"
    for number, servable in versions:
        shutil.copytree(servable, base / str(number))
    config = ModelConfigList(models=(ModelConfig(name="half_plus_two", base_path=str(base)),))
    return Repository(config, poll_seconds=0, cache=ServableCache(tmp_path / "cache"))


def test_a_version_is_not_ready_until_its_warmup_finishes(examples, tmp_path, monkeypatch):
    started, finish = threading.Event(), threading.Event()
    real = repository_module.warm_up

    def held(engine, iterations, depth):  # the real warm-up, held at its end until the test has looked
        runs = real(engine, iterations, depth)
        started.set()
        finish.wait(30)
        return runs

    monkeypatch.setattr(repository_module, "warm_up", held)
    repository = repository_of(tmp_path, (1, examples["half_plus_two"].servable))
    loading = threading.Thread(target=repository.start)
    loading.start()
    assert started.wait(60)
    assert not repository.is_available("half_plus_two")
    assert [v.state for v in repository.status("half_plus_two").versions] == [State.LOADING]
    finish.set()
    loading.join(60)
    assert repository.is_available("half_plus_two")
    status = repository.status("half_plus_two").versions[0]
    assert status.state is State.AVAILABLE and status.warmup_seconds > 0
    repository.stop()


def test_a_failing_warmup_fails_the_load_and_the_old_version_keeps_serving(examples, tmp_path):
    wrong = tfrecord(tmp_path / "requests", [predict_log("half_plus_two", x=np.zeros((2, 3), np.float32))])
    broken = with_warmup(examples["half_plus_two"].servable, tmp_path / "broken", "tf_serving_warmup_requests", wrong)
    repository = repository_of(tmp_path, (1, examples["half_plus_two"].servable))
    repository.start()
    shutil.copytree(broken, tmp_path / "models" / "half_plus_two" / "2")
    repository.poll()
    two, one = repository.status("half_plus_two").versions
    assert two.state is State.ERROR and "warm-up request 0 (signature 'serving_default') failed" in two.error
    assert "must have shape" in two.error
    assert one.state is State.AVAILABLE
    with repository.hold("half_plus_two") as handle:
        assert handle.version == 1
        assert handle.engine.run("serving_default", {"x": np.array([4.0], np.float32)})["y"].tolist() == [4.0]
    repository.stop()


def test_kiln_compile_carries_the_warmup_file(examples, tmp_path):
    from runtime.compiler.compile import compile_servable

    saved_model = tmp_path / "saved_model"
    shutil.copytree(examples["half_plus_two"].saved_model, saved_model)
    (saved_model / WARMUP_DIR).mkdir(exist_ok=True)
    data = tfrecord(saved_model / WARMUP_DIR / "tf_serving_warmup_requests",
                    [predict_log("half_plus_two", x=np.array([1.0], np.float32))])
    manifest = compile_servable(saved_model, tmp_path / "half_plus_two" / "1", signatures=["serving_default"],
                                batch_sizes=(1, 2), log=lambda line: None)
    assert f"{WARMUP_DIR}/tf_serving_warmup_requests" in manifest.files
    assert (tmp_path / "half_plus_two" / "1" / WARMUP_DIR / "tf_serving_warmup_requests").read_bytes() == data
