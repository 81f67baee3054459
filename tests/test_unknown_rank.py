"""Inputs of unknown rank, served as TF Serving serves them (any rank).

TF Serving's own saved_model_half_plus_two is built here as its script builds it: a TF1 graph whose
`x` is a placeholder with no shape. Its predict signature is elementwise, so Kiln compiles it ahead
of time over flat runs of elements and answers any rank exactly as TensorFlow does; a signature
that is not elementwise over an unknown-rank input (a sum) goes to the saved-model engine, saying
why. Both are compiled with `kiln compile` and served by `kiln serve` over REST and gRPC.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import orjson
import pytest

from runtime.manifest import Manifest
from tests.conftest import ROOT, free_port, stop, wait_until_up
from tests.scoring_rows import engine_module

BUCKETS = "1,4"  # small, so that most requests span several buckets
ROW_BODIES = [[1.0, 2.0, 5.0], [[1.0, 2.0], [3.0, 4.0]], [[[1.0, -2.5], [0.25, 8.0]], [[3.0, 4.0], [5.5, 6.0]]]]
COLUMNAR_BODIES = [3.0, [1.0, 2.0, 5.0], [[1.0, 2.0], [3.0, 4.0]], [[[1.0, 2.0, 3.0]], [[4.0, 5.0, 6.0]]]]


def save_half_plus_two(out: Path) -> None:
    """As tensorflow_serving/servables/tensorflow/testdata/saved_model_half_plus_two.py: y = a*x + b
    over a float placeholder of no shape; classify/regress read serialized tf.Examples."""
    import tensorflow as tf

    v1 = tf.compat.v1
    builder = v1.saved_model.Builder(str(out))
    with v1.Graph().as_default() as graph, v1.Session(graph=graph) as session:
        a = v1.Variable(0.5, name="a")
        b = v1.Variable(2.0, name="b")
        x = v1.placeholder(tf.float32, name="x")
        y = tf.add(tf.multiply(a, x), b, name="y")
        serialized = v1.placeholder(tf.string, name="tf_example")
        parsed = v1.io.parse_example(serialized, {"x": v1.io.FixedLenFeature([1], tf.float32)})
        example_y = tf.add(tf.multiply(a, parsed["x"]), b, name="example_y")
        predict = v1.saved_model.predict_signature_def(inputs={"x": x}, outputs={"y": y})
        signatures = {
            "serving_default": predict, "predict": predict,
            "classify_x_to_y": v1.saved_model.classification_signature_def(serialized, None, example_y),
            "regress_x_to_y": v1.saved_model.regression_signature_def(serialized, example_y),
        }
        session.run(v1.global_variables_initializer())
        builder.add_meta_graph_and_variables(session, ["serve"], signature_def_map=signatures)
    builder.save()


def save_any_rank(out: Path) -> None:
    """A TF2 SavedModel over inputs of unknown rank: one elementwise signature (through a called
    function and a variable), one that sums (not elementwise)."""
    import tensorflow as tf

    module = tf.Module()
    module.scale = tf.Variable(3.0)

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name="x")])
    def scaled(x):
        return {"y": tf.nn.relu(x) * module.scale + 1.0, "negative": tf.cast(x < 0.0, tf.int32)}

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name="x")])
    def total(x):
        return {"total": tf.reduce_sum(x)}

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32, name="x")])
    def matrix(x):
        return {"halved": x / 2.0}

    tf.saved_model.save(module, str(out), signatures={"serving_default": scaled, "total": total, "matrix": matrix})


def kiln(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{name: SavedModel directory}, and the repository `kiln compile` made of them."""
    root = tmp_path_factory.mktemp("unknown-rank")
    saved = {"half_plus_two": root / "saved" / "half_plus_two", "any_rank": root / "saved" / "any_rank"}
    save_half_plus_two(saved["half_plus_two"])
    save_any_rank(saved["any_rank"])
    repository = root / "repository"
    for name, path in saved.items():
        done = kiln("compile", str(path), str(repository / name / "1"), "--batch-sizes", BUCKETS)
        assert done.returncode == 0, done.stderr
    return saved, repository


@pytest.fixture(scope="module")
def server(models):
    """`kiln serve` over the repository: (REST URL, gRPC target)."""
    import httpx

    _, repository = models
    rest, grpc_port = free_port(), free_port()
    log_path = repository.parent / "serve.log"
    with log_path.open("w+") as log:
        process = subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve", "--model-repository",
                                    str(repository), "--rest-port", str(rest), "--grpc-port", str(grpc_port),
                                    "--host", "127.0.0.1"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{rest}"
        wait_until_up(process, lambda: all(httpx.get(f"{url}/v1/models/{name}", timeout=2).status_code == 200
                                           for name in ("half_plus_two", "any_rank")), log_path, "kiln serve")
        try:
            yield url, f"127.0.0.1:{grpc_port}"
        finally:
            stop(process)


@functools.cache
def _loaded(saved_model: Path):
    import tensorflow as tf

    return tf.saved_model.load(str(saved_model))


def tensorflow_answers(saved_model: Path, key: str, value) -> dict[str, np.ndarray]:
    import tensorflow as tf

    function = _loaded(saved_model).signatures[key]
    return {name: tensor.numpy() for name, tensor in function(x=tf.constant(value, tf.float32)).items()}


def post(url: str, path: str, body) -> tuple[int, dict]:
    import httpx

    response = httpx.post(f"{url}{path}", content=orjson.dumps(body), timeout=60)
    assert response.headers["content-type"] == "application/json"
    return response.status_code, response.json()


def test_compile_records_unknown_rank_elementwise_or_the_reason(models):
    _, repository = models
    half = Manifest.parse_json((repository / "half_plus_two" / "1" / "manifest.json").read_bytes())
    predict = half.signatures["serving_default"]
    assert predict.engine == "xla-aot" and predict.elementwise and predict.inputs[0].shape is None
    assert half.signatures["predict"].elementwise
    for key in ("classify_x_to_y", "regress_x_to_y"):  # tf.Examples parsed on the host (issue 17)
        assert half.signatures[key].engine == "xla-aot" and half.signatures[key].host is not None

    any_rank = Manifest.parse_json((repository / "any_rank" / "1" / "manifest.json").read_bytes())
    assert any_rank.signatures["serving_default"].elementwise
    total = any_rank.signatures["total"]
    assert total.engine == "saved-model" and not total.elementwise and not total.batched
    assert "input 'x' has unknown rank" in total.reason and "op Sum" in total.reason
    inspected = kiln("inspect", str(repository / "any_rank" / "1"))
    assert inspected.returncode == 0, inspected.stderr
    assert "total: not ahead-of-time compiled: input 'x' has unknown rank" in inspected.stdout
    assert "op Sum" in inspected.stdout and "serving_default: elementwise" in inspected.stdout


def test_forced_aot_names_a_signature_not_elementwise_over_unknown_rank(models, tmp_path):
    saved, _ = models
    done = kiln("compile", str(saved["any_rank"]), str(tmp_path / "any_rank" / "1"), "--engine", "xla-aot",
                "--signatures", "total", "--batch-sizes", BUCKETS)
    assert done.returncode != 0
    assert "signature 'total' cannot be compiled ahead of time" in done.stderr and "op Sum" in done.stderr


@pytest.mark.parametrize("model, key", [("half_plus_two", "serving_default"), ("half_plus_two", "predict"),
                                        ("any_rank", "serving_default")])
def test_every_rank_answers_what_tensorflow_answers(models, server, model, key):
    saved, _ = models
    url, _ = server
    for row_format, bodies in ((True, ROW_BODIES), (False, COLUMNAR_BODIES)):
        for value in bodies:
            want = tensorflow_answers(saved[model], key, value)
            body = {"signature_name": key, "instances" if row_format else "inputs": value}
            status, answer = post(url, f"/v1/models/{model}:predict", body)
            assert status == 200, answer
            got = answer["predictions" if row_format else "outputs"]
            if len(want) == 1:
                assert got == next(iter(want.values())).tolist(), body
            elif row_format:  # named outputs, one object per instance
                assert got == [{name: want[name][i].tolist() for name in want} for i in range(len(value))], body
            else:
                assert got == {name: array.tolist() for name, array in want.items()}, body


def test_tf_serving_documented_answer(server):
    url, _ = server
    assert post(url, "/v1/models/half_plus_two:predict", {"instances": [[1.0, 2.0], [3.0, 4.0]]}) == \
        (200, {"predictions": [[2.5, 3.0], [3.5, 4.0]]})
    assert post(url, "/v1/models/half_plus_two:predict", {"inputs": []}) == (200, {"outputs": []})


def test_requests_of_different_shapes_batched_together_each_get_their_own(server):
    url, _ = server
    values = [np.arange(n * m, dtype=np.float32).reshape(n, m).tolist() for n in range(1, 7) for m in range(1, 4)]
    values += [[float(n)] * n for n in range(1, 10)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda v: post(url, "/v1/models/half_plus_two:predict", {"inputs": v}),
                                values * 3))
    for value, (status, answer) in zip(values * 3, answers):
        assert status == 200, answer
        assert answer["outputs"] == (np.asarray(value, np.float32) * 0.5 + 2).tolist()


def test_dynamic_inner_dimensions_of_a_known_rank_are_elementwise_too(models, server):
    saved, repository = models
    url, _ = server
    manifest = Manifest.parse_json((repository / "any_rank" / "1" / "manifest.json").read_bytes())
    assert manifest.signatures["matrix"].elementwise and manifest.signatures["matrix"].inputs[0].shape == (None, None)
    value = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    status, answer = post(url, "/v1/models/any_rank:predict", {"signature_name": "matrix", "inputs": value})
    want = tensorflow_answers(saved["any_rank"], "matrix", value)["halved"]
    assert (status, answer) == (200, {"outputs": want.tolist()})
    status, answer = post(url, "/v1/models/any_rank:predict", {"signature_name": "matrix", "inputs": [1.0, 2.0]})
    assert status == 400 and "must have shape [-1, -1], got [2]" in answer["error"]


def test_ragged_instances_are_refused_with_400(server):
    url, _ = server
    status, answer = post(url, "/v1/models/half_plus_two:predict", {"instances": [[1.0, 2.0], [3.0]]})
    assert status == 400 and "error" in answer


def test_not_elementwise_unknown_rank_is_served_by_the_saved_model_engine(models, server):
    saved, _ = models
    url, _ = server
    for value in (2.0, [1.0, 2.0], [[1.0, 2.0], [3.0, 4.0]]):
        status, answer = post(url, "/v1/models/any_rank:predict", {"signature_name": "total", "inputs": value})
        assert status == 200, answer
        assert answer["outputs"] == tensorflow_answers(saved["any_rank"], "total", value)["total"].tolist()


def test_batch_scoring_takes_rows_of_any_rank(models):
    """The batch engines' scorer (runtime/integrations/core.py) over an input and output of unknown
    rank: rows of any one shape, a bad row reported beside the good, an all-bad and an empty batch."""
    from runtime.integrations.core import Scorer

    _, repository = models
    scorer = Scorer.open(repository / "half_plus_two" / "1")
    scored = scorer.score({"x": [1.0, 2.0, 5.0]})
    assert scored.errors == [None] * 3
    np.testing.assert_allclose(scored.outputs["y"], [2.5, 3.0, 4.5])
    pairs = scorer.score({"x": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)})
    np.testing.assert_allclose(pairs.outputs["y"], [[2.5, 3.0], [3.5, 4.0]])
    one_bad = scorer.score({"x": [1.0, None, 5.0]})
    assert one_bad.errors[0] is None and one_bad.errors[2] is None and "no value" in one_bad.errors[1]
    np.testing.assert_allclose(one_bad.outputs["y"], [2.5, np.nan, 4.5])
    all_bad = scorer.score({"x": [None, "text"]})
    assert "no value" in all_bad.errors[0] and "must have dtype float32" in all_bad.errors[1]
    assert all_bad.outputs["y"].shape == (2,) and np.isnan(all_bad.outputs["y"]).all()
    empty = scorer.score({"x": []})
    assert empty.errors == [] and empty.outputs["y"].shape == (0,)


def test_spark_refuses_an_output_of_unknown_rank_by_name(models):
    """predict_batch_udf needs each field's type (a value or an array per row) before any row is scored."""
    engine_module("pyspark")
    from runtime.errors import ConfigError
    from runtime.integrations.spark import return_type

    _, repository = models
    with pytest.raises(ConfigError, match="output 'y' has unknown rank"):
        return_type(repository / "half_plus_two" / "1")


def test_metadata_reports_unknown_rank_as_tf_serving_does(server):
    import grpc
    import httpx
    from tensorflow_serving.apis import get_model_metadata_pb2, prediction_service_pb2_grpc

    url, target = server
    rest = httpx.get(f"{url}/v1/models/half_plus_two/metadata", timeout=10).json()
    signature = rest["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["inputs"]["x"]["tensor_shape"] == {"dim": [], "unknown_rank": True}
    assert signature["outputs"]["y"]["tensor_shape"]["unknown_rank"] is True

    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "half_plus_two"
    with grpc.insecure_channel(target) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(request, timeout=10)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    shape = signatures.signature_def["serving_default"].inputs["x"].tensor_shape
    assert shape.unknown_rank and not shape.dim


def test_a_manifest_from_before_unknown_rank_loads_and_reads_as_before():
    """Written by a Kiln that had no `elementwise` field and no null shape."""
    old = {"format_version": 1, "name": "m", "version": 1, "engine": "saved-model",
           "signatures": {"serving_default": {
               "method": "tensorflow/serving/predict", "engine": "saved-model", "batched": True, "libraries": {},
               "reason": "input 'x' has dtype string, which XLA AOT cannot take", "jit": False,
               "inputs": [{"name": "x", "dtype": "string", "shape": [None]}],
               "outputs": [{"name": "y", "dtype": "float32", "shape": [None, 1]}]}},
           "batch_sizes": [1, 4], "target": {"triple": "x86_64-pc-linux", "cpu": "x86-64", "features": []},
           "tensorflow_version": "2.21.0", "files": {}}
    manifest = Manifest.parse(old)
    assert not manifest.signatures["serving_default"].elementwise
    assert orjson.loads(manifest.to_json()) == json.loads(json.dumps(old)), "written back exactly as it was"
