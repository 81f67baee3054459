"""Signatures with string inputs served without TensorFlow (issue 17): the string front (tf.Example
parsing, vocabulary lookups, hash buckets) on the host, the numeric remainder compiled ahead of
time, answering as TensorFlow does, over generated strings, through REST and gRPC."""

from __future__ import annotations

import base64
import json
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from examples.wide_deep import DENSE, HASH_BINS, VOCABULARY
from runtime.compiler.compile import compile_servable
from runtime.engines import open_servable
from runtime.host_program import HostFront
from runtime.manifest import HashBucketStep, LookupStep, read_manifest
from tests.conftest import free_port, install_examples, kiln_serve, run_python, wait_until_up

tf = pytest.importorskip("tensorflow")
TOLERANCE = 1e-6
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                            HealthCheck.function_scoped_fixture])
# Items: in the vocabulary, near misses, empty, non-ASCII, arbitrary bytes (not UTF-8), long.
items = st.one_of(st.sampled_from(VOCABULARY).map(str.encode), st.sampled_from(VOCABULARY).map(lambda v: v.upper().encode()),
                  st.just(b""), st.text(max_size=12).map(str.encode), st.binary(max_size=40),
                  st.binary(min_size=1000, max_size=3000))
floats = st.floats(-10, 10, width=32)  # normalized features: float32 sums of larger ones round differently


@pytest.fixture(scope="module")
def wide_deep(examples):
    example = examples["wide_deep"]
    engine = open_servable(example.servable)
    yield example, engine, tf.saved_model.load(str(example.saved_model))
    engine.close()


def test_wide_deep_and_half_plus_two_signatures_are_compiled_behind_host_fronts(examples):
    for name, keys in (("wide_deep", ("serving_default", "examples")),
                       ("half_plus_two", ("classify_x_to_y", "regress_x_to_y", "regress_x2_to_y3"))):
        manifest = read_manifest(examples[name].servable)
        for key in keys:
            signature = manifest.signatures[key]
            assert signature.engine == "xla-aot" and signature.host is not None, (name, key, signature.reason)
    steps = {step.op for step in read_manifest(examples["wide_deep"].servable).signatures["examples"].host.steps}
    assert steps == {"parse_example", "lookup", "hash_bucket"}



def test_synthetic_inputs_of_host_fronted_signatures_run(examples):
    """Warm-up's made-up tf.Examples keep their trailing zero bytes (half_plus_two's end in a float
    0.0): np.full over bytes strips them, and the example no longer parses."""
    from runtime.engines.base import synthetic_inputs

    engine = open_servable(examples["half_plus_two"].servable)
    try:
        for key in ("classify_x_to_y", "regress_x_to_y", "regress_x2_to_y3"):
            for bucket in engine.manifest.batch_sizes[:2]:
                outputs = engine.run(key, synthetic_inputs(engine.signature(key), bucket))
                assert all(len(value) == bucket for value in outputs.values()), key
    finally:
        engine.close()

@SETTINGS
@given(st.lists(st.tuples(items, items, st.lists(floats, min_size=DENSE, max_size=DENSE)), min_size=1, max_size=40))
def test_wide_deep_ids_and_scores_equal_tensorflow(wide_deep, rows):
    import keras

    example, engine, loaded = wide_deep
    item = np.array([r[0] for r in rows], dtype=object)
    query = np.array([r[1] for r in rows], dtype=object)
    dense = np.array([r[2] for r in rows], dtype=np.float32)
    ours = engine.run("serving_default", {"item": item, "query": query, "dense": dense})["score"]
    theirs = loaded.signatures["serving_default"](item=tf.constant(item.tolist(), tf.string),
                                                  query=tf.constant(query.tolist(), tf.string),
                                                  dense=tf.constant(dense))["score"].numpy()
    np.testing.assert_allclose(ours, theirs, atol=TOLERANCE, rtol=0)

    program = engine.signature("serving_default").host
    front = HostFront(example.servable, program).run({"item": item, "query": query, "dense": dense})
    lookup = next(step for step in program.steps if isinstance(step, LookupStep))
    hashed = next(step for step in program.steps if isinstance(step, HashBucketStep))
    ids = keras.layers.StringLookup(vocabulary=list(VOCABULARY), num_oov_indices=1)(tf.constant(item.tolist()))
    buckets = keras.layers.Hashing(HASH_BINS)(tf.constant(query.tolist()))
    assert front[lookup.output].tolist() == np.asarray(ids).tolist()
    assert front[hashed.output].tolist() == np.asarray(buckets).tolist()


def serialized(rows) -> list[bytes]:
    protos = []
    for item, query, dense in rows:
        feature = {"dense": tf.train.Feature(float_list=tf.train.FloatList(value=dense))}
        if item is not None:
            feature["item"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[item]))
        if query is not None:
            feature["query"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[query]))
        protos.append(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return protos


@SETTINGS
@given(st.lists(st.tuples(st.none() | items, st.none() | items, st.lists(floats, min_size=DENSE, max_size=DENSE)),
                min_size=1, max_size=40))
def test_wide_deep_examples_signature_equals_tensorflow(wide_deep, rows):
    """tf.Examples parsed on the host (absent item/query take their default "")."""
    _, engine, loaded = wide_deep
    protos = serialized(rows)
    ours = engine.run("examples", {"examples": np.array(protos, dtype=object)})["score"]
    theirs = loaded.signatures["examples"](examples=tf.constant(protos, tf.string))["score"].numpy()
    np.testing.assert_allclose(ours, theirs, atol=TOLERANCE, rtol=0)


SERVE_WITHOUT_TENSORFLOW = """
import json, sys
import numpy as np
from runtime.engines import open_servable
from runtime.codecs.examples import serialize
wide = open_servable(sys.argv[1])
half = open_servable(sys.argv[2])
score = wide.run("serving_default", {"item": np.array([b"item_0007", "über".encode(), b""], dtype=object),
                                     "query": np.array([b"red shoes", b"\\xff", b""], dtype=object),
                                     "dense": np.ones((3, 4), np.float32)})["score"]
parsed = wide.run("examples", {"examples": serialize([{"item": "item_0007", "query": "red shoes", "dense": [1.0] * 4}])})
y = half.run("regress_x_to_y", {"inputs": serialize([{"x": 3.0}, {"x": 5.0}])})["outputs"]
print(json.dumps({"tensorflow": sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow"),
                  "score": score.ravel().tolist(), "parsed": parsed["score"].ravel().tolist(), "y": y.ravel().tolist()}))
"""


def test_served_in_a_fresh_interpreter_without_tensorflow(wide_deep, examples):
    example, _, loaded = wide_deep
    done = run_python(SERVE_WITHOUT_TENSORFLOW, str(example.servable), str(examples["half_plus_two"].servable))
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["tensorflow"] == []
    theirs = loaded.signatures["serving_default"](item=tf.constant([b"item_0007", "über".encode(), b""]),
                                                  query=tf.constant([b"red shoes", b"\xff", b""]),
                                                  dense=tf.ones((3, 4)))["score"].numpy().ravel()
    np.testing.assert_allclose(answer["score"], theirs, atol=TOLERANCE, rtol=0)
    assert answer["parsed"] == pytest.approx([theirs[0]], abs=TOLERANCE)
    assert answer["y"] == [3.5, 4.5]


@pytest.fixture(scope="module")
def vocabulary_model(tmp_path_factory):
    """A StaticVocabularyTable over a text-file asset with 3 out-of-vocabulary buckets (feature
    columns' categorical_column_with_vocabulary_file), compiled; and the SavedModel."""
    root = tmp_path_factory.mktemp("vocabulary")
    (root / "vocab.txt").write_text("apple\nbanana\ncherry\nこんにちは\n")

    class Fruit(tf.Module):
        def __init__(self):
            initializer = tf.lookup.TextFileInitializer(
                str(root / "vocab.txt"), tf.string, tf.lookup.TextFileIndex.WHOLE_LINE, tf.int64,
                tf.lookup.TextFileIndex.LINE_NUMBER)
            self.table = tf.lookup.StaticVocabularyTable(initializer, num_oov_buckets=3)
            self.embedding = tf.Variable(tf.random.stateless_normal([7, 2], seed=[1, 2]))

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="fruit")])
        def __call__(self, fruit):
            ids = self.table.lookup(fruit)
            return {"vector": tf.gather(self.embedding, ids), "id": tf.cast(ids, tf.float32)}

    module = Fruit()
    tf.saved_model.save(module, str(root / "saved_model"), signatures=module.__call__)
    compile_servable(root / "saved_model", root / "servable" / "1", batch_sizes=(1, 4))
    return root / "saved_model", root / "servable" / "1"


@SETTINGS
@given(st.lists(st.one_of(st.sampled_from(["apple", "banana", "cherry", "こんにちは"]).map(str.encode), items),
                min_size=1, max_size=9))
def test_vocabulary_file_with_oov_buckets_equals_tensorflow(vocabulary_model, fruits):
    saved_model, servable = vocabulary_model
    engine = open_servable(servable)
    try:
        assert engine.signature("serving_default").host is not None
        ours = engine.run("serving_default", {"fruit": np.array(fruits, dtype=object)})
    finally:
        engine.close()
    theirs = tf.saved_model.load(str(saved_model)).signatures["serving_default"](fruit=tf.constant(fruits, tf.string))
    assert ours["id"].tolist() == theirs["id"].numpy().tolist()
    np.testing.assert_allclose(ours["vector"], theirs["vector"].numpy(), atol=TOLERANCE, rtol=0)


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


@pytest.fixture(scope="module")
def served(examples, tmp_path_factory):
    """kiln serve (REST and gRPC) over half_plus_two, digits and wide_deep."""
    import grpc
    import httpx

    root = tmp_path_factory.mktemp("strings")
    install_examples(examples, root, names=("wide_deep",))
    grpc_port = free_port()
    with kiln_serve(examples, root, "--grpc-port", str(grpc_port)) as (process, url):
        wait_until_up(process, lambda: httpx.get(f"{url}/v1/models/wide_deep", timeout=2).status_code == 200,
                      process.log_path, "wide_deep")
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        yield url, channel
        channel.close()


def test_rest_classify_regress_and_examples_predict(served, wide_deep):
    import httpx

    url, _ = served
    _, _, loaded = wide_deep
    answer = httpx.post(f"{url}/v1/models/half_plus_two:classify", timeout=30,
                        json={"signature_name": "classify_x_to_y", "examples": [{"x": 1.0}, {"x": 2.0}]})
    assert answer.status_code == 200 and answer.json() == {"results": [[["", 2.5]], [["", 3.0]]]}
    answer = httpx.post(f"{url}/v1/models/half_plus_two:regress", timeout=30,
                        json={"signature_name": "regress_x2_to_y3", "context": {"x2": 4.0},
                              "examples": [{"x": 1.0}, {"x2": 2.0}]})
    assert answer.status_code == 200 and answer.json() == {"results": [5.0, 4.0]}

    protos = serialized([(b"item_0042", "naïve query".encode(), [0.5, -1.0, 2.0, 0.0]),
                         (b"not an item", None, [1.0, 1.0, 1.0, 1.0])])
    answer = httpx.post(f"{url}/v1/models/wide_deep:predict", timeout=30,
                        json={"signature_name": "examples", "instances": [b64(p) for p in protos]})
    assert answer.status_code == 200, answer.text
    theirs = loaded.signatures["examples"](examples=tf.constant(protos))["score"].numpy()
    np.testing.assert_allclose(answer.json()["predictions"], theirs, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("body, meaning", [
    ({"signature_name": "examples", "instances": [b64(serialized([(b"a", b"b", [1.0] * DENSE)])[0][:-3])]},
     "Could not parse example input"),
    ({"signature_name": "examples", "instances": [b64(tf.train.Example().SerializeToString())]},
     "Feature: dense (data type: float) is required but could not be found."),
    ({"signature_name": "examples", "instances": [b64(tf.train.Example(features=tf.train.Features(feature={
        "dense": tf.train.Feature(int64_list=tf.train.Int64List(value=[1, 2, 3, 4]))})).SerializeToString())]},
     "Key: dense, Index: 0.  Data types don't match. Data type: int64 but expected type: float"),
    ({"signature_name": "examples", "instances": [b64(tf.train.Example(features=tf.train.Features(feature={
        "dense": tf.train.Feature(float_list=tf.train.FloatList(value=[1.0]))})).SerializeToString())]},
     "Number of float values != expected.  Values size: 1 but output shape: [4]"),
])
def test_malformed_examples_get_400_with_tensorflows_meaning(served, body, meaning):
    import httpx

    url, _ = served
    answer = httpx.post(f"{url}/v1/models/wide_deep:predict", json=body, timeout=30)
    assert answer.status_code == 400 and meaning in answer.json()["error"], answer.text


def test_grpc_classify_regress_and_malformed_examples(served):
    import grpc
    from tensorflow_serving.apis import (classification_pb2, input_pb2, predict_pb2, prediction_service_pb2_grpc,
                                         regression_pb2)

    _, channel = served
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

    def examples(*features):
        request_input = input_pb2.Input()
        for feature in features:
            request_input.example_list.examples.add().features.feature["x"].CopyFrom(feature)
        return request_input

    def number(value: float):
        return tf.train.Feature(float_list=tf.train.FloatList(value=[value]))

    request = classification_pb2.ClassificationRequest(input=examples(number(1.0), number(9.0)))
    request.model_spec.name, request.model_spec.signature_name = "half_plus_two", "classify_x_to_y"
    assert [[c.score for c in row.classes] for row in stub.Classify(request, timeout=30).result.classifications] == \
        [[2.5], [6.5]]
    request = regression_pb2.RegressionRequest(input=examples(
        tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"not a float"]))))
    request.model_spec.name, request.model_spec.signature_name = "half_plus_two", "regress_x_to_y"
    with pytest.raises(grpc.RpcError) as error:
        stub.Regress(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Data types don't match. Data type: string but expected type: float" in error.value.details()

    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = "wide_deep", "examples"
    request.inputs["examples"].CopyFrom(tf.make_tensor_proto([b"\x0a\x05\x0a\x03"]))
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Could not parse example input" in error.value.details()


def test_half_plus_two_examples_of_random_values(served):
    """Many classify requests of random sizes: every answer is the model's, none mixed up."""
    import httpx

    url, _ = served
    rng = random.Random(17)
    for _ in range(20):
        xs = [rng.uniform(-100, 100) for _ in range(rng.randint(1, 40))]
        answer = httpx.post(f"{url}/v1/models/half_plus_two:regress", timeout=30,
                            json={"signature_name": "regress_x_to_y", "examples": [{"x": x} for x in xs]})
        assert answer.status_code == 200
        np.testing.assert_allclose(answer.json()["results"], np.float32(np.float32(xs) * 0.5 + 2), rtol=1e-6)
