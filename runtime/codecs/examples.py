"""TensorFlow Serving's JSON classify and regress format: {"signature_name"?, "context"?,
"examples": [...]} to serialized tf.Example protos, and the signature's outputs to "results".

Feature values map as TF Serving maps them: JSON integers to int64_list, other numbers to
float_list, strings and {"b64": ...} to bytes_list; a list holds several values of one kind. The
context's features are merged into every example.
"""

from __future__ import annotations

import numpy as np

from runtime.codecs.tfserving import DEFAULT_SIGNATURE, b64_bytes, loads
from runtime.errors import InvalidInput, shown
from runtime.manifest import CLASSIFY, REGRESS, Signature


def read_examples(body: bytes) -> tuple[str, list[dict]]:
    """The signature name and the examples, each a dict of features with the context merged in."""
    request = loads(body)
    if not isinstance(request, dict):
        raise InvalidInput("the request body must be a JSON object")
    name = request.get("signature_name", DEFAULT_SIGNATURE)
    if not isinstance(name, str):
        raise InvalidInput("'signature_name' must be a string")
    examples, context = request.get("examples"), request.get("context", {})
    if not isinstance(examples, list) or not examples or not all(isinstance(e, dict) for e in examples):
        raise InvalidInput("'examples' must be a non-empty list of objects")
    if not isinstance(context, dict):
        raise InvalidInput("'context' must be an object")
    return name, [{**context, **example} for example in examples]


def serialize(examples: list[dict]) -> np.ndarray:
    """Serialized tf.Example protos, one per example, as the signature's string input."""
    from runtime.protos import generated_module

    example_pb2 = generated_module("tensorflow.core.example.example_pb2")
    serialized = []
    for example in examples:
        proto = example_pb2.Example()
        for key, value in example.items():
            _fill(proto.features.feature[key], key, value if isinstance(value, list) else [value])
        serialized.append(proto.SerializeToString())
    return np.array(serialized, dtype=object)


INT64 = (-(2**63), 2**63 - 1)


def _fill(feature, key: str, values: list) -> None:
    if all(isinstance(v, bool) for v in values) or not values:
        raise InvalidInput(f"feature '{key}' must hold numbers, strings or b64 objects, got {shown(values)}")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if (outside := next((v for v in values if not INT64[0] <= v <= INT64[1]), None)) is not None:
            raise InvalidInput(f"feature '{key}': integers must fit in int64 (an int64_list), got {shown(outside)}")
        feature.int64_list.value.extend(values)
    elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        feature.float_list.value.extend(_float(key, v) for v in values)
    elif all(isinstance(v, (str, dict)) for v in values):
        feature.bytes_list.value.extend(_bytes(key, v) for v in values)
    else:
        raise InvalidInput(f"feature '{key}' mixes kinds of values: {shown(values)}")


def _float(key: str, value: int | float) -> float:
    """A float_list value; an integer beside floats may be too large for any float (10**400)."""
    try:
        return float(value)
    except OverflowError:
        raise InvalidInput(f"feature '{key}': {shown(value)} is too large for a float (a float_list)") from None


def _bytes(key: str, value) -> bytes:
    return value.encode() if isinstance(value, str) else b64_bytes(f"feature '{key}'", value)


def check_method(name: str, signature: Signature, method: str) -> str:
    """The signature's one string input, after checking it is a classify or regress signature."""
    if signature.method != method:
        raise InvalidInput(f"signature '{name}' has method {signature.method}; this request needs {method}")
    strings = [spec.name for spec in signature.inputs if spec.dtype == "string"]
    if len(signature.inputs) != 1 or not strings:
        raise InvalidInput(f"signature '{name}' must take one string input of serialized tf.Examples")
    return strings[0]


def from_input(message) -> np.ndarray:
    """tensorflow.serving.Input (gRPC) to serialized examples, as TF Serving makes them: the
    context's bytes before each example's, so that parsing merges the two with the example's own
    features taking precedence."""
    kind = message.WhichOneof("kind")
    if kind is None:
        raise InvalidInput("Input is empty: set example_list or example_list_with_context")
    listed = getattr(message, kind)
    if not listed.examples:
        raise InvalidInput(f"Input is empty: {kind} has no examples")
    context = listed.context.SerializeToString() if kind == "example_list_with_context" else b""
    return np.array([context + example.SerializeToString() for example in listed.examples], dtype=object)


def classifications(outputs: dict[str, np.ndarray]) -> list[list[tuple[str, float | None]]]:
    """Per example, its (label, score) pairs: labels "" without a classes output, scores None
    without a scores output."""
    scores, classes = outputs.get("scores"), outputs.get("classes")
    rows = len(scores) if scores is not None else len(classes) if classes is not None else 0
    results = []
    for i in range(rows):
        labels = [c.decode() if isinstance(c, bytes) else str(c) for c in classes[i]] if classes is not None else None
        values = scores[i].tolist() if scores is not None else [None] * len(labels or ())
        results.append([(labels[j] if labels else "", values[j]) for j in range(len(values))])
    return results


def regressions(outputs: dict[str, np.ndarray]) -> list[float]:
    return np.asarray(outputs["outputs"]).reshape(-1).tolist()


def encode_results(outputs: dict[str, np.ndarray], method: str) -> dict:
    """Classify: per example a list of [label, score]; regress: one value per example."""
    if method == REGRESS:
        return {"results": regressions(outputs)}
    return {"results": [[list(pair) for pair in row] for row in classifications(outputs)]}


METHODS = {"classify": CLASSIFY, "regress": REGRESS}
