"""Fuzz: bad input against a real `kiln serve` (REST and gRPC), counting the answers by status class;
the figure that matters is the number of 5xx answers (and gRPC INTERNAL / UNKNOWN), which must be 0,
and that every error is TF Serving's {"error": "..."} JSON.

Why: a client's mistake must be answered with a 4xx that says what was wrong, never a 500 or a
plain-text error; the suite runs this generator for 20,000 bodies (tests/test_fuzz.py), this script
for as many as asked, to find the rarer cases.

How: a seeded mutator (random.Random, so a run is reproducible from its seed) takes valid requests
of every kind (TF Serving predict, classify, regress and Kiln's :generate over REST; infer in the Open
Inference Protocol's JSON and its binary extension; gRPC Predict, Classify, Regress, metadata and
status, OIP ModelInfer, ModelMetadata and ModelReady, and Kiln's Generate) for half_plus_two, digits
and tiny_lm, and damages them: nodes of the JSON replaced by awkward values (huge or non-finite
numbers, lone surrogates escaped or raw as bytes ED A0 80, nulls, ragged rows, b64 objects), keys
dropped or added, bytes inserted or the body cut; gRPC messages built with random dtypes, shapes and
contents, then their bytes damaged. REST bodies go over one persistent HTTP/1.1 connection
(http.client), gRPC calls over one channel, one at a time, so the rate is the server's error path
plus the client's own cost.

The server is `python -m runtime.cli serve` over the example servables (built or taken from the
cache under ~/.cache/kiln), on loopback. The output is JSON: bodies sent, answers by status class
(REST) and code (gRPC), 5xx count, bodies per second, and the first failures in full.

    python load/fuzz.py [--bodies 100000] [--seed 0] [--grpc-share 0.2]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import random
import re
import struct
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = ("half_plus_two", "digits", "tiny_lm")
TIMEOUT = 30.0
BAD_CODES = ("INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED")  # a bug, a crash, a hang
HEADER_LENGTH = "Inference-Header-Content-Length"
RAW = "\x00raw:"  # a string standing for raw JSON text, put in after json.dumps (1e400 has no Python value)
RAW_TEXT = re.compile(rb'"\\u0000raw:([^"]*)"')


NUMBERS = [0, 1, -1, 2, 1.5, -0.0, 255, 256, 2**31 - 1, 2**31, -2**31 - 1, 2**53 + 1, 2**63 - 1, 2**63, -2**63,
           -2**63 - 1, 2**64, 10**30, 10**400, 1e308, -1e308, 5e-324, float("nan"), float("inf"), float("-inf"),
           RAW + "1e400", RAW + "-1e400", RAW + "1e-400", RAW + "9" * 400, RAW + "-0", RAW + "1E2"]
STRINGS = ["", "a", "x", "y", "abc", "serving_default", "classify_x_to_y", "regress_x_to_y", "regress_x2_to_y3",
           "prefill", "decode", "\ud800", "\udc00", "a\ud800b", "\udfff\ud800", "\x00", "é", "\U0001f600", "\uffff",
           "a" * 1000, "YQ==", "!!!", "NaN", "1", "true", "-1", "1.5"]
KEYS = ["instances", "inputs", "signature_name", "examples", "context", "prompt", "tokens", "max_tokens",
        "temperature", "seed", "session", "stream", "name", "shape", "datatype", "data", "parameters", "outputs",
        "id", "binary_data", "binary_data_size", "binary_data_output", "sequence_id", "sequence_end", "b64", "x",
        "x2", "images", "token", "count", "position", "y", "probabilities", "", "\ud800"]
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
             "FP64", "BYTES", "BF16", "fp32", ""]
TOKENS = [b"NaN", b"Infinity", b"-Infinity", b"nan", b"1e400", b"-1e400", b"9" * 400, b"\xff", b"\xc3\x28",
          b"\xed\xa0\x80", b"\xed\xbf\xbf", b'"\\ud800"', b"\x00", b'{"b64": "!!!"}', b'"', b"[", b"]", b"{", b"}",
          b",", b":", b"\\", b"true", b"null", b"\xef\xbb\xbf", b"[[1],[1,2]]", b"[true]", b"-", b"0x10"]


def filled(value, shape: tuple[int, ...]):
    """Nested lists of a shape, holding one value everywhere."""
    for size in reversed(shape):
        value = [value] * size
    return value


def _image() -> list:
    return filled(0.5, (28, 28, 1))


# Valid requests of every kind: (method, path, body). A body is a JSON value, or (JSON header, binary data)
# for the binary tensor data extension.
def rest_templates() -> list[tuple[str, object]]:
    x = {"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}
    return [
        ("/v1/models/half_plus_two:predict", {"instances": [1.0, 2.0, 5.0]}),
        ("/v1/models/half_plus_two:predict", {"inputs": {"x": [1.0, 2.0]}}),
        ("/v1/models/half_plus_two/versions/1:predict", {"signature_name": "serving_default", "inputs": [3.0]}),
        ("/v1/models/half_plus_two:predict", {"signature_name": "classify_x_to_y",
                                              "instances": ["abc", {"b64": "YQ=="}]}),
        ("/v1/models/half_plus_two:predict", {"signature_name": "regress_x2_to_y3", "inputs": {"inputs": ["a"]}}),
        ("/v1/models/digits:predict", {"instances": [_image()]}),
        ("/v1/models/digits:predict", {"instances": [{"images": _image()}]}),
        ("/v1/models/half_plus_two:classify", {"signature_name": "classify_x_to_y",
                                               "examples": [{"x": 1.0}, {"x": [2.0]}], "context": {}}),
        ("/v1/models/half_plus_two:regress", {"signature_name": "regress_x_to_y", "examples": [{"x": 3}]}),
        ("/v1/models/half_plus_two:regress", {"signature_name": "regress_x2_to_y3", "context": {"x2": 1.0},
                                              "examples": [{"x2": 2.0}, {}]}),
        ("/v1/models/half_plus_two:classify", {"signature_name": "classify_x_to_y",
                                               "examples": [{"x": "abc", "b": {"b64": "YQ=="}}]}),
        ("/v1/models/tiny_lm:generate", {"prompt": "hi", "max_tokens": 2}),
        ("/v1/models/tiny_lm:generate", {"tokens": [104, 105], "max_tokens": 1, "temperature": 0.7, "seed": 3}),
        ("/v1/models/tiny_lm:generate", {"prompt": "x", "max_tokens": 1, "stream": True, "session": "abc"}),
        ("/v1/models/tiny_lm:predict", {"signature_name": "decode", "instances": [{"token": 5}]}),
        ("/v1/models/tiny_lm:predict", {"signature_name": "prefill", "inputs": {"tokens": [[1] * 128], "count": [1]}}),
        ("/v2/models/half_plus_two/infer", {"inputs": [x], "outputs": [{"name": "y"}], "id": "r1"}),
        ("/v2/models/half_plus_two/versions/1/infer", {"parameters": {"signature_name": "classify_x_to_y"}, "inputs": [
            {"name": "inputs", "shape": [2], "datatype": "BYTES", "data": ["abc", "d"]}]}),
        ("/v2/models/digits/infer", {"inputs": [{"name": "images", "shape": [1, 28, 28, 1], "datatype": "FP32",
                                                 "data": [0.0] * 784}]}),
        ("/v2/models/tiny_lm/infer", {"parameters": {"signature_name": "decode"}, "inputs": [
            {"name": "token", "shape": [1], "datatype": "INT32", "data": [5]}]}),
        ("/v2/models/half_plus_two/infer", ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32",
                                                         "parameters": {"binary_data_size": 8}}],
                                             "outputs": [{"name": "y", "parameters": {"binary_data": True}}]},
                                            struct.pack("<2f", 1.0, 2.0))),
        ("/v2/models/half_plus_two/infer", ({"parameters": {"signature_name": "classify_x_to_y"}, "inputs": [
            {"name": "inputs", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 7}}]},
            struct.pack("<I", 3) + b"abc")),
    ]


@dataclass(frozen=True)
class RestCase:
    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"

    def show(self) -> str:
        body = repr(self.body[:400]) + (f"... ({len(self.body)} bytes)" if len(self.body) > 400 else "")
        return f"{self.method} {self.path} {self.headers or ''} {body}"


@dataclass(frozen=True)
class GrpcCase:
    method: str
    request: bytes
    streaming: bool = False

    def show(self) -> str:
        return f"{self.method} {self.request[:400]!r}" + (f"... ({len(self.request)} bytes)"
                                                         if len(self.request) > 400 else "")


class Mutator:
    """Bodies from a seed: valid requests, damaged at the JSON level and at the byte level."""

    def __init__(self, seed: int):
        self.random = random.Random(seed)
        self.templates = rest_templates()

    # JSON values ----------------------------------------------------------------------------------

    def value(self, depth: int = 0):
        pick = self.random.random()
        if pick < 0.3:
            return self.random.choice(NUMBERS)
        if pick < 0.55:
            return self.random.choice(STRINGS)
        if pick < 0.62:
            return self.random.choice([True, False, None])
        if pick < 0.7:
            return {"b64": self.random.choice(["YQ==", "!!!", "", 5, None, "\ud800", [1]])}
        if pick < 0.75:
            return self.random.choice([[[1], [1, 2]], [["a"], ["a", "b"]], [[1, [2]]], [["a", ["b"]]], [[]], [[], [1]]])
        if depth > 2:
            return self.random.choice(NUMBERS + STRINGS)
        if pick < 0.9:
            return [self.value(depth + 1) for _ in range(self.random.randint(0, 4))]
        return {self.random.choice(KEYS): self.value(depth + 1) for _ in range(self.random.randint(0, 3))}

    def mutate(self, tree):
        """The tree with one node replaced, dropped, added to or reshaped."""
        if not isinstance(tree, (dict, list)) or not tree or self.random.random() < 0.15:
            return self.value()
        if isinstance(tree, dict):
            key = self.random.choice(list(tree))
            choice = self.random.random()
            if choice < 0.15:
                return {k: v for k, v in tree.items() if k != key}
            if choice < 0.3:
                return {**tree, self.random.choice(KEYS): self.value()}
            return {**tree, key: self.mutate(tree[key])}
        index = self.random.randrange(len(tree))
        choice = self.random.random()
        if choice < 0.1:
            return tree[:index] + tree[index + 1:]
        if choice < 0.2:
            return tree + [self.random.choice([tree[index], self.value()])]
        if choice < 0.25:
            return tree * self.random.choice([2, 3])
        return tree[:index] + [self.mutate(tree[index])] + tree[index + 1:]

    def dumps(self, tree) -> bytes:
        """JSON text: non-ASCII written raw or escaped, a lone surrogate as "\\ud800" or as the
        bytes ED A0 80 (which orjson refuses and the standard parser, given bytes, takes)."""
        text = json.dumps(tree, allow_nan=True, ensure_ascii=self.random.random() < 0.5)
        return RAW_TEXT.sub(lambda m: m[1], text.encode("utf-8", "surrogatepass"))

    def damage(self, body: bytes) -> bytes:
        at = self.random.randint(0, len(body))
        how = self.random.random()
        if how < 0.25:
            return body[:at]
        token = self.random.choice(TOKENS) if self.random.random() < 0.8 else self.random.randbytes(
            self.random.randint(1, 6))
        return body[:at] + token + body[at + (self.random.randint(1, 4) if how < 0.6 else 0):]

    # REST -----------------------------------------------------------------------------------------

    def rest(self) -> RestCase:
        path, body = self.random.choice(self.templates)
        if self.random.random() < 0.05:  # a body sent to another endpoint
            path = self.random.choice(self.templates)[0]
        binary = None
        if isinstance(body, tuple):
            body, binary = body
        for _ in range(self.random.choice([0, 1, 1, 1, 2, 2, 3])):
            body = self.mutate(body)
        text = self.dumps(body)
        if self.random.random() < 0.25:
            text = self.damage(text)
        headers = {"Content-Type": "application/json"}
        if binary is not None:
            if self.random.random() < 0.3:
                binary = self.damage(binary)
            length = len(text) if self.random.random() < 0.8 else self.random.choice(
                [0, len(text) + 1, len(text) - 1, -1, 10**20])
            headers[HEADER_LENGTH] = str(length) if self.random.random() < 0.95 else self.random.choice(
                ["", "x", "1.5", "\xe9", " 12"])
            return RestCase(path, text + binary, headers)
        return RestCase(path, text, headers)

    # gRPC -----------------------------------------------------------------------------------------

    def grpc(self) -> GrpcCase:
        kind = self.random.choices(["predict", "examples", "infer", "generate", "metadata"], [3, 2, 3, 1, 1])[0]
        case = getattr(self, f"_grpc_{kind}")()
        if self.random.random() < 0.25:
            case = GrpcCase(case.method, self.damage(case.request), case.streaming)
        return case

    def _model(self) -> str:
        return self.random.choice([*MODELS, *MODELS, "", "nope", "\x00", "é"])

    def _spec(self, spec) -> None:
        spec.name = self._model()
        spec.signature_name = self.random.choice(["", "serving_default", "classify_x_to_y", "regress_x_to_y",
                                                  "regress_x2_to_y3", "decode", "nope"])
        if self.random.random() < 0.2:
            spec.version.value = self.random.choice([0, 1, 2, -1, 2**63 - 1])
        elif self.random.random() < 0.1:
            spec.version_label = self.random.choice(["stable", "", "x"])

    def _array(self):
        import numpy as np

        dtype = self.random.choice(["float32", "float64", "int32", "int64", "uint8", "bool", "float16", "object"])
        shape = self.random.choice([(), (1,), (3,), (2, 1), (0,), (1, 28, 28, 1), (1, 128), (2, 0)])
        value = self.random.choice([0, 1, 255]) if dtype != "object" else self.random.choice([b"", b"abc", b"\xff"])
        return np.full(shape, value, dtype=object).astype(dtype)

    def _grpc_predict(self) -> GrpcCase:
        from runtime.codecs.tensor_proto import from_ndarray

        request = _protos().predict.PredictRequest()
        self._spec(request.model_spec)
        for name in self.random.sample(["x", "images", "inputs", "token", "tokens", "count", ""],
                                       self.random.randint(0, 2)):
            from_ndarray(self._array(), request.inputs[name])
            tensor = request.inputs[name]
            if self.random.random() < 0.3:
                tensor.tensor_shape.dim.add(size=self.random.choice([-1, 0, 2, 2**40, 2**62]))
            if self.random.random() < 0.1:
                tensor.tensor_shape.unknown_rank = True
            if self.random.random() < 0.2:
                tensor.dtype = self.random.choice([0, 1, 3, 7, 9, 10, 19, 23, 30, 101])
        return GrpcCase("/tensorflow.serving.PredictionService/Predict", request.SerializeToString())

    def _grpc_examples(self) -> GrpcCase:
        protos = _protos()
        classify = self.random.random() < 0.5
        request = protos.classification.ClassificationRequest() if classify else \
            protos.regression.RegressionRequest()
        self._spec(request.model_spec)
        with_context = self.random.random() < 0.3
        listed = request.input.example_list_with_context if with_context else request.input.example_list
        for _ in range(self.random.randint(0, 3)):
            example = listed.examples.add()
            for key in self.random.sample(["x", "x2", "y", ""], self.random.randint(0, 2)):
                feature = example.features.feature[key]
                kind = self.random.choice(["int64_list", "float_list", "bytes_list"])
                values = {"int64_list": [0, 1, -2**63, 2**63 - 1], "float_list": [0.0, 1.5, float("nan")],
                          "bytes_list": [b"", b"abc", b"\xff"]}[kind]
                getattr(feature, kind).value.extend(self.random.choices(values, k=self.random.randint(0, 3)))
        if with_context and self.random.random() < 0.5:
            listed.context.features.feature["x"].float_list.value.append(2.0)
        method = "Classify" if classify else "Regress"
        return GrpcCase(f"/tensorflow.serving.PredictionService/{method}", request.SerializeToString())

    def _grpc_infer(self) -> GrpcCase:
        request = _protos().oip.ModelInferRequest(model_name=self._model(),
                                                  model_version=self.random.choice(["", "", "1", "2", "x", "-1"]),
                                                  id=self.random.choice(["", "r1", "é"]))
        if self.random.random() < 0.4:
            request.parameters["signature_name"].string_param = self.random.choice(
                ["decode", "prefill", "classify_x_to_y", "serving_default", "nope"])
        if self.random.random() < 0.1:
            request.parameters["signature_name"].int64_param = 1
        raw = self.random.random() < 0.5
        for _ in range(self.random.randint(0, 2)):
            shape = self.random.choice([[2], [1], [], [0], [1, 28, 28, 1], [1, 128], [-1], [2**40, 2**40], [3, 0]])
            tensor = request.inputs.add(name=self.random.choice(["x", "images", "inputs", "token", "count", ""]),
                                        datatype=self.random.choice(DATATYPES), shape=shape)
            count = max(0, math.prod(shape)) if math.prod(shape) < 1000 else self.random.randint(0, 4)
            count += self.random.choice([0, 0, 0, 1, -1]) if count else 0
            if raw:
                request.raw_input_contents.append(self.random.randbytes(count * self.random.choice([1, 2, 4, 8])))
            else:
                field = self.random.choice(["fp32_contents", "int_contents", "int64_contents", "bytes_contents",
                                            "bool_contents", "uint64_contents", "fp64_contents"])
                values = {"bytes_contents": b"abc", "bool_contents": True}.get(field, 1)
                getattr(tensor.contents, field).extend([values] * max(count, 0))
        for name in self.random.sample(["y", "logits", "nope"], self.random.randint(0, 1)):
            request.outputs.add(name=name)
        return GrpcCase("/inference.GRPCInferenceService/ModelInfer", request.SerializeToString())

    def _grpc_generate(self) -> GrpcCase:
        request = _protos().generation.GenerateRequest(
            model_name=self.random.choice(["tiny_lm", "tiny_lm", "half_plus_two", "nope"]),
            model_version=self.random.choice([0, 0, 1, 2, -1]), max_tokens=self.random.choice([0, 1, 2, -1, 5000]),
            temperature=self.random.choice([0.0, 0.5, -1.0, float("nan"), float("inf")]),
            session=self.random.choice(["", "", "abc", "\x00"]))
        if self.random.random() < 0.5:
            request.prompt = self.random.choice(["hi", "", "é", "a" * 300])
        else:
            request.tokens.ids.extend(self.random.choices([0, 104, 255, 256, -1], k=self.random.randint(0, 3)))
        if self.random.random() < 0.3:
            request.has_seed, request.seed = True, self.random.choice([0, 1, -1])
        return GrpcCase("/kiln.Generation/Generate", request.SerializeToString(), streaming=True)

    def _grpc_metadata(self) -> GrpcCase:
        protos = _protos()
        choice = self.random.randrange(4)
        if choice == 0:
            request = protos.metadata.GetModelMetadataRequest()
            self._spec(request.model_spec)
            request.metadata_field.extend(self.random.sample(["signature_def", "x", ""], self.random.randint(0, 2)))
            return GrpcCase("/tensorflow.serving.PredictionService/GetModelMetadata", request.SerializeToString())
        if choice == 1:
            request = protos.status.GetModelStatusRequest()
            self._spec(request.model_spec)
            return GrpcCase("/tensorflow.serving.ModelService/GetModelStatus", request.SerializeToString())
        message = protos.oip.ModelMetadataRequest if choice == 2 else protos.oip.ModelReadyRequest
        request = message(name=self._model(), version=self.random.choice(["", "1", "x", "99999999999999999999"]))
        method = "ModelMetadata" if choice == 2 else "ModelReady"
        return GrpcCase(f"/inference.GRPCInferenceService/{method}", request.SerializeToString())


class _Protos:
    def __init__(self):
        from runtime.protos import generated_module

        self.predict = generated_module("tensorflow_serving.apis.predict_pb2")
        self.classification = generated_module("tensorflow_serving.apis.classification_pb2")
        self.regression = generated_module("tensorflow_serving.apis.regression_pb2")
        self.metadata = generated_module("tensorflow_serving.apis.get_model_metadata_pb2")
        self.status = generated_module("tensorflow_serving.apis.get_model_status_pb2")
        self.oip = generated_module("grpc_service_pb2")
        self.generation = generated_module("kiln.generation_pb2")


_loaded: list[_Protos] = []


def _protos() -> _Protos:
    if not _loaded:
        _loaded.append(_Protos())
    return _loaded[0]


# Sending and judging ------------------------------------------------------------------------------

class RestClient:
    """One persistent HTTP/1.1 connection, opened again when the server closes it."""

    def __init__(self, host: str, port: int):
        self.host, self.port, self.connection = host, port, None

    def send(self, case: RestCase) -> tuple[int, str, bytes]:
        for attempt in range(2):
            if self.connection is None:
                self.connection = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
            try:
                self.connection.request(case.method, case.path, body=case.body, headers=case.headers)
                response = self.connection.getresponse()
                data = response.read()
                if response.will_close:
                    self.close()
                return response.status, response.getheader("content-type", ""), data
            except (OSError, http.client.HTTPException):
                self.close()  # a connection the server closed after its last answer: try a fresh one once
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def rest_problem(status: int, content_type: str, data: bytes) -> str | None:
    """What is wrong with an answer, or None: no 5xx; JSON where JSON is said; an error is exactly
    {"error": "<message>"}, a streamed error event {"error": "<message>", "status": <4xx>}."""
    if status >= 500:
        return f"answered {status}: {data[:500]!r}"
    if content_type.startswith("text/event-stream"):
        for line in data.split(b"\n"):
            if line.startswith(b"data: ") and b'"error"' in line:
                event = json.loads(line[6:])
                if not isinstance(event.get("error"), str) or event.get("status", 0) >= 500:
                    return f"stream error event {line[:500]!r}"
        return None
    if status < 400 and content_type.startswith("application/octet-stream"):
        return None  # the binary tensor data extension's answer
    if not content_type.startswith("application/json"):
        return f"answered {status} with content type {content_type!r}: {data[:500]!r}"
    try:
        answer = json.loads(data)  # TF Serving's JSON: bare NaN and Infinity allowed
    except ValueError:
        return f"answered {status} with a body that is not JSON: {data[:500]!r}"
    if status >= 400 and not (isinstance(answer, dict) and list(answer) == ["error"]
                              and isinstance(answer["error"], str) and answer["error"]):
        return f"answered {status} with an error that is not {{\"error\": str}}: {data[:500]!r}"
    return None


def grpc_code(channel, case: GrpcCase) -> tuple[str, str | None]:
    """The call's status code name ("OK" on success), and what is wrong with it, or None."""
    import grpc

    try:
        if case.streaming:
            stub = channel.unary_stream(case.method, request_serializer=None, response_deserializer=None)
            for _ in stub(case.request, timeout=TIMEOUT):
                pass
        else:
            stub = channel.unary_unary(case.method, request_serializer=None, response_deserializer=None)
            stub(case.request, timeout=TIMEOUT)
        return "OK", None
    except grpc.RpcError as e:
        code = e.code().name
        return code, f"{code}: {e.details()}" if code in BAD_CODES else None


@dataclass
class Report:
    """What a run found: answers by status class (REST) and code (gRPC), and the failures."""

    rest: Counter = field(default_factory=Counter)
    grpc: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def bodies(self) -> int:
        return sum(self.rest.values()) + sum(self.grpc.values())

    def summary(self) -> dict:
        return {"bodies": self.bodies, "rest_bodies": sum(self.rest.values()), "grpc_calls": sum(self.grpc.values()),
                "rest_status_classes": dict(sorted(self.rest.items())), "grpc_codes": dict(sorted(self.grpc.items())),
                "5xx": self.rest["5xx"], "grpc_internal_or_unknown": sum(self.grpc[c] for c in BAD_CODES),
                "failures": len(self.failures), "seconds": round(self.seconds, 1),
                "bodies_per_second": round(self.bodies / self.seconds, 1) if self.seconds else None,
                "first_failures": self.failures[:10]}


def fuzz(host: str, rest_port: int, grpc_port: int | None, bodies: int, seed: int = 0, grpc_share: float = 0.2,
         report: Report | None = None) -> Report:
    """Send `bodies` fuzzed requests (a `grpc_share` of them gRPC calls, when grpc_port is given),
    from `seed`, one at a time; the report counts every answer and describes every failure."""
    report = report or Report()
    mutator, client = Mutator(seed), RestClient(host, rest_port)
    channel = None
    if grpc_port is not None:
        import grpc

        channel = grpc.insecure_channel(f"{host}:{grpc_port}")
    started = time.perf_counter()
    try:
        for _ in range(bodies):
            if channel is not None and mutator.random.random() < grpc_share:
                case = mutator.grpc()
                code, problem = grpc_code(channel, case)
                report.grpc[code] += 1
            else:
                case = mutator.rest()
                try:
                    status, content_type, data = client.send(case)
                except (OSError, http.client.HTTPException) as e:
                    status, problem = 0, f"no answer: {e!r}"
                else:
                    problem = rest_problem(status, content_type, data)
                report.rest[f"{status // 100}xx"] += 1
            if problem is not None:
                report.failures.append(f"{case.show()} -> {problem}")
    finally:
        report.seconds += time.perf_counter() - started
        client.close()
        if channel is not None:
            channel.close()
    return report


def main() -> None:
    from common import example_servables, kiln_serve

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bodies", type=int, default=100_000, help="requests to send (default 100000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grpc-share", type=float, default=0.2, help="the share of requests sent over gRPC")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kiln-fuzz-") as work:
        work = Path(work)
        with contextlib.redirect_stdout(sys.stderr):  # the build's log; stdout is the JSON
            example_servables(work / "models", list(MODELS))
        with kiln_serve(work / "models", "tiny_lm", work / "serve.log", []) as (server, rest_port, grpc_port):
            for model in MODELS:  # kiln_serve waits for one model; the others load beside it
                _wait_available(rest_port, model)
            report = fuzz("127.0.0.1", rest_port, grpc_port, args.bodies, args.seed, args.grpc_share)
            alive = server.poll() is None
        summary = {"seed": args.seed, **report.summary(), "server_alive_after": alive}
    print(json.dumps(summary, indent=2))
    if report.failures or not alive:
        sys.exit(1)


def _wait_available(port: int, model: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    client = RestClient("127.0.0.1", port)
    while b'"AVAILABLE"' not in client.send(RestCase(f"/v1/models/{model}", b"", method="GET"))[2]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{model} did not become AVAILABLE in {seconds} s")
        time.sleep(0.2)
    client.close()


if __name__ == "__main__":
    main()
