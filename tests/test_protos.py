"""The project's .proto files and their build step: modules generated into their own package,
stubs for services, rebuilt only when needed, and wire-identical to TensorFlow Serving's."""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil

import orjson
import pytest
from google.protobuf import text_format

from runtime.protos import generated_module
from runtime.protos.build import ROOT, build
from tests.conftest import run_python
from tests.test_model_config import EXPECTED, MODELS_CONFIG

FILES = ["log_collector_config", "logging_config", "file_system_storage_path_source", "model_server_config"]
TRITON_FILES = ["model_config.proto", "grpc_service.proto"]  # the Open Inference Protocol's gRPC API

ECHO = """\
syntax = "proto3";
package kiln.test;
import "tensorflow_serving/config/model_server_config.proto";
message Reply { string text = 1; }
service Echo { rpc Reload(tensorflow.serving.ModelServerConfig) returns (Reply); }
"""


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A copy of the .proto tree plus one file with a service, generated into an importable package."""
    root = tmp_path / "protos"
    shutil.copytree(ROOT, root, ignore=lambda _, names: [n for n in names if n == "generated" or
                                                         n.endswith((".py", ".pyc")) or n.startswith(".")])
    (root / "kiln_test").mkdir()
    (root / "kiln_test" / "echo.proto").write_text(ECHO)
    monkeypatch.syspath_prepend(str(tmp_path))
    return root, tmp_path / "kiln_test_generated"


def test_generates_modules_and_stubs_with_imports_into_the_package(tree):
    root, out = tree
    assert build(root, out, "kiln_test_generated") is True
    generated = {str(path.relative_to(out)) for path in out.rglob("*_pb2*.py")}
    protos = {str(path.relative_to(root))[:-len(".proto")] for path in root.rglob("*.proto")}
    services = {"kiln_test/echo", "tensorflow_serving/apis/prediction_service", "tensorflow_serving/apis/model_service",
                "grpc_service", "kiln/generation"}
    assert generated == {f"{name}_pb2.py" for name in protos} | {f"{name}_pb2_grpc.py" for name in services}
    assert "from kiln_test_generated.tensorflow_serving.config import model_server_config_pb2" in (
        out / "kiln_test" / "echo_pb2.py").read_text()
    stubs = importlib.import_module("kiln_test_generated.kiln_test.echo_pb2_grpc")
    assert hasattr(stubs, "EchoStub") and hasattr(stubs, "EchoServicer")
    request = stubs.tensorflow__serving_dot_config_dot_model__server__config__pb2.ModelServerConfig()
    assert request.DESCRIPTOR.full_name == "tensorflow.serving.ModelServerConfig"


def test_rebuilds_only_when_a_proto_changes_appears_or_goes(tree):
    root, out = tree
    assert build(root, out, "kiln_test_generated") is True
    assert build(root, out, "kiln_test_generated") is False
    later = (out / "kiln_test" / "echo_pb2.py").stat().st_mtime + 10
    os.utime(root / "kiln_test" / "echo.proto", (later, later))
    assert build(root, out, "kiln_test_generated") is True
    (root / "kiln_test" / "echo.proto").unlink()
    assert build(root, out, "kiln_test_generated") is True
    assert not (out / "kiln_test").exists()
    (root / "extra.proto").write_text('syntax = "proto3";\npackage kiln.extra;\nmessage E {}\n')
    assert build(root, out, "kiln_test_generated") is True
    assert (out / "extra_pb2.py").is_file()


def test_a_failed_build_keeps_the_previous_modules(tree, capfd):
    root, out = tree
    build(root, out, "kiln_test_generated")
    before = sorted(out.rglob("*.py"))
    (root / "kiln_test" / "echo.proto").write_text(ECHO.replace("message Reply {", "message Reply {{"))
    with pytest.raises(SystemExit, match="protoc failed"):
        build(root, out, "kiln_test_generated")
    assert "echo.proto" in capfd.readouterr().err
    assert sorted(out.rglob("*.py")) == before
    assert not [path for path in out.parent.iterdir() if path.name.startswith(".generated-")]


def test_a_missing_module_names_the_build_step():
    with pytest.raises(ModuleNotFoundError, match=r"run `python -m runtime\.protos\.build` \(make setup\)"):
        generated_module("tensorflow_serving.config.no_such_pb2")


def test_runtime_parsing_imports_neither_tensorflow_nor_grpc():
    done = run_python("import sys; from runtime.model_config import parse_model_config; "
                      "parse_model_config(sys.argv[1], 'text'); "
                      "print(sorted({m.split('.')[0] for m in sys.modules} & "
                      "{'tensorflow', 'tensorflow_serving', 'grpc', 'grpc_tools', 'yaml'}))", MODELS_CONFIG)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# --- against the real tensorflow-serving-api package (a test-only dependency) --------------------

needs_tf_serving = pytest.mark.skipif(importlib.util.find_spec("tensorflow_serving") is None,
                                      reason="tensorflow-serving-api is not installed")

# Run in a fresh interpreter so that nothing of Kiln's is registered when TF Serving's modules load.
TF_SERVING_SIDE = """
import sys, orjson
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2 as config
from tensorflow_serving.config import file_system_storage_path_source_pb2, logging_config_pb2
from tensorflow_serving.config import log_collector_config_pb2
message = text_format.Parse(sys.argv[1], config.ModelServerConfig())
files = [log_collector_config_pb2, logging_config_pb2, file_system_storage_path_source_pb2, config]
print(orjson.dumps({"binary": message.SerializeToString(deterministic=True).hex(),
                    "descriptors": {m.DESCRIPTOR.name: m.DESCRIPTOR.serialized_pb.hex() for m in files}}).decode())
"""


@needs_tf_serving
def test_binary_form_is_interchangeable_with_tf_serving():
    done = run_python(TF_SERVING_SIDE, MODELS_CONFIG)
    assert done.returncode == 0, done.stderr
    theirs = orjson.loads(done.stdout)
    ours = generated_module("tensorflow_serving.config.model_server_config_pb2")
    message = ours.ModelServerConfig.FromString(bytes.fromhex(theirs["binary"]))
    assert message == text_format.Parse(MODELS_CONFIG, ours.ModelServerConfig())
    assert message.SerializeToString(deterministic=True).hex() == theirs["binary"]
    from runtime.model_config import from_proto

    assert from_proto(message) == EXPECTED


@needs_tf_serving
def test_descriptors_are_identical_to_tf_serving():
    """Identical descriptors are what let both sets of modules load into one process (a test
    client using tensorflow-serving-api beside an in-process Kiln server)."""
    theirs = orjson.loads(run_python(TF_SERVING_SIDE, "").stdout)["descriptors"]
    for name in FILES:
        module = generated_module(f"tensorflow_serving.config.{name}_pb2")
        assert module.DESCRIPTOR.serialized_pb.hex() == theirs[module.DESCRIPTOR.name], name


# Every file of the gRPC API: the services' import closure, TensorFlow's own protos included.
API_SIDE = """
import orjson
from tensorflow_serving.apis import model_service_pb2, prediction_service_pb2
files = {}
def walk(file):
    for dependency in file.dependencies:
        walk(dependency)
    if not file.name.startswith("google/protobuf/"):
        files[file.name] = file.serialized_pb.hex()
walk(prediction_service_pb2.DESCRIPTOR)
walk(model_service_pb2.DESCRIPTOR)
print(orjson.dumps(files).decode())
"""


@needs_tf_serving
def test_grpc_api_descriptors_are_identical_to_tf_serving():
    done = run_python(API_SIDE)
    assert done.returncode == 0, done.stderr
    theirs = orjson.loads(done.stdout)
    ours = {str(path.relative_to(ROOT)) for path in ROOT.rglob("*.proto")} - set(TRITON_FILES)
    assert {name for name in ours if not name.startswith("kiln/")} == set(theirs)  # kiln/: Kiln's own messages
    for name, serialized in theirs.items():
        module = generated_module(name[:-len(".proto")].replace("/", ".") + "_pb2")
        assert module.DESCRIPTOR.serialized_pb.hex() == serialized, name


@needs_tf_serving
@pytest.mark.parametrize("first", ["kiln", "tensorflow_serving"])
def test_both_load_into_one_process(first):
    imports = {"kiln": "from runtime.protos import generated_module; "
                       "ours = generated_module('tensorflow_serving.config.model_server_config_pb2')",
               "tensorflow_serving": "from tensorflow_serving.config import model_server_config_pb2 as theirs"}
    code = "; ".join([imports[first], *(v for k, v in imports.items() if k != first),
                      "m = theirs.ModelServerConfig(); m.model_config_list.config.add(name='m')",
                      "assert ours.ModelServerConfig.FromString(m.SerializeToString()) == m"])
    done = run_python(code)
    assert done.returncode == 0, done.stderr



# --- against tritonclient's grpc_service.proto (the Open Inference Protocol over gRPC) -----------

needs_tritonclient = pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None,
                                        reason="tritonclient is not installed")

# What Kiln's GRPCInferenceService serves, and every message those calls carry.
OIP_METHODS = ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"]
OIP_MESSAGES = ["ServerLiveRequest", "ServerLiveResponse", "ServerReadyRequest", "ServerReadyResponse",
                "ModelReadyRequest", "ModelReadyResponse", "ServerMetadataRequest", "ServerMetadataResponse",
                "ModelMetadataRequest", "ModelMetadataResponse", "ModelInferRequest", "ModelInferResponse",
                "InferTensorContents", "InferParameter"]

# Run in a fresh interpreter per side, so that nothing of the other side is registered when one loads.
OIP_SIDE = """
import sys, orjson
if sys.argv[1] == "tritonclient":
    from tritonclient.grpc import model_config_pb2, service_pb2
else:
    from runtime.protos import generated_module
    model_config_pb2, service_pb2 = generated_module("model_config_pb2"), generated_module("grpc_service_pb2")
def fields(message):
    table = {message.full_name: [[f.number, f.name, f.type, f.is_repeated, f.message_type.full_name if f.message_type else "",
                                  f.containing_oneof.name if f.containing_oneof else ""] for f in message.fields]}
    for nested in message.nested_types:
        table.update(fields(nested))
    return table
service = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
print(orjson.dumps({
    "descriptors": {m.DESCRIPTOR.name: m.DESCRIPTOR.serialized_pb.hex() for m in (model_config_pb2, service_pb2)},
    "fields": {k: v for name in sys.argv[2:] for k, v in fields(service_pb2.DESCRIPTOR.message_types_by_name[name]).items()},
    "methods": {m.name: [m.input_type.full_name, m.output_type.full_name] for m in service.methods},
}).decode())
"""


@pytest.fixture(scope="module")
def oip_sides() -> dict[str, dict]:
    sides = {}
    for side in ("kiln", "tritonclient"):
        done = run_python(OIP_SIDE, side, *OIP_MESSAGES)
        assert done.returncode == 0, done.stderr
        sides[side] = orjson.loads(done.stdout)
    return sides


@needs_tritonclient
def test_oip_descriptors_are_identical_to_tritonclient(oip_sides):
    """Byte-identical files are what let tritonclient's modules and Kiln's share protobuf's default
    pool: a file of another name defining the same `inference.*` messages (KServe's
    grpc_predict_v2.proto) would be refused there as a duplicate symbol."""
    ours, theirs = oip_sides["kiln"]["descriptors"], oip_sides["tritonclient"]["descriptors"]
    assert set(theirs) == set(TRITON_FILES) == set(ours)
    for name in TRITON_FILES:
        assert ours[name] == theirs[name], name


@needs_tritonclient
def test_oip_messages_have_tritonclients_fields(oip_sides):
    """Field by field (number, name, type, repeated, message type, oneof), for every message the
    served calls carry: a readable failure if the files ever drift apart."""
    ours, theirs = oip_sides["kiln"], oip_sides["tritonclient"]
    assert "inference.ModelInferRequest.InferInputTensor" in theirs["fields"]
    assert set(ours["fields"]) == set(theirs["fields"])
    for name, fields in theirs["fields"].items():
        assert ours["fields"][name] == fields, name
    for name in OIP_METHODS:
        assert ours["methods"][name] == theirs["methods"][name], name


@needs_tritonclient
@pytest.mark.parametrize("first", ["kiln", "tritonclient"])
def test_oip_protos_load_beside_tritonclient(first):
    imports = {"kiln": "from runtime.protos import generated_module; ours = generated_module('grpc_service_pb2')",
               "tritonclient": "from tritonclient.grpc import service_pb2 as theirs"}
    code = "; ".join([imports[first], *(v for k, v in imports.items() if k != first),
                      "m = theirs.ModelInferRequest(model_name='digits', raw_input_contents=[b'x'])",
                      "m.inputs.add(name='images', datatype='FP32', shape=[1, 28, 28, 1])",
                      "assert ours.ModelInferRequest.FromString(m.SerializeToString()) == m"])
    done = run_python(code)
    assert done.returncode == 0, done.stderr
