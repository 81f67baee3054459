"""Warm-up: before a version is AVAILABLE, its signatures run, so no request pays a first call's cost
(page faults in the libraries, thread pools starting, the saved-model engine's tracing).

Two depths (KILN_WARMUP). "first", the default: the servable's own warm-up requests, each replayed as
it is (as TF Serving does), or, without any, one call of each signature at the smallest bucket. AOT
code has no lazy initialization, so another bucket's first call pays only the page faults of its own
library (its code; the runtime and the weights are shared) on first use. "all": every request and
signature at every bucket, as described below; the version is AVAILABLE later, by the time it takes
to run them, and no request meets a page fault.

The inputs are the servable's own warm-up requests where it has them: TensorFlow Serving's
assets.extra/tf_serving_warmup_requests (a TFRecord file of PredictionLog records; read here without
TensorFlow, its checksums verified: runtime.tfrecord) or Kiln's assets.extra/kiln_warmup.json (a list of TF Serving
predict bodies). Each request is replayed at every bucket, its rows repeated to fill the bucket,
`iterations` times. Signatures no request covers get synthesized inputs (zeros) at every bucket;
string signatures without a request are skipped, as no input can be made up that the model must
accept, and so are saved-model signatures with inputs of unknown rank, for the same reason
(elementwise ones take any shape, so their zeros are a flat run at every bucket). A warm-up
request that fails fails the load, as in TF Serving: a servable whose own requests do not run is
not served.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np

from runtime.codecs.tfserving import DEFAULT_SIGNATURE
from runtime.engines.base import Engine, synthetic_inputs
from runtime.errors import KilnError, ServableError
from runtime.tfrecord import read_records

WARMUP_DIR = "assets.extra"
TF_SERVING_WARMUP = "tf_serving_warmup_requests"
KILN_WARMUP = "kiln_warmup.json"
WARMUP_FILES = (TF_SERVING_WARMUP, KILN_WARMUP)


WarmupDepth = Literal["first", "all"]


def warm_up(engine: Engine, iterations: int = 1, depth: WarmupDepth = "all") -> int:
    """Run the warm-up to `depth` (see the module's documentation); returns how many executions it made."""
    requests = warmup_requests(engine.directory)
    runs = 0
    for index, (key, inputs) in enumerate(requests):
        try:
            for _ in range(iterations):
                for bucket_inputs in _at_every_bucket(engine, key, inputs) if depth == "all" else [inputs]:
                    engine.run(key, bucket_inputs)
                    runs += 1
        except KilnError as e:
            raise ServableError(f"warm-up request {index} (signature '{key}') failed: {e}") from None
    covered = {key for key, _ in requests}
    for key, signature in engine.signatures.items():
        if key in covered or any(spec.dtype == "string" for spec in signature.inputs):
            continue
        if not signature.elementwise and any(spec.shape is None for spec in signature.inputs):
            continue  # a shape of unknown rank that the model accepts cannot be made up
        if requests and depth == "first":
            continue  # the servable's own requests are its warm-up
        buckets = engine.manifest.batch_sizes if signature.batched else (0,)
        for bucket in buckets if depth == "all" else buckets[:1]:
            engine.run(key, synthetic_inputs(signature, bucket))
            runs += 1
    return runs


def _at_every_bucket(engine: Engine, key: str, inputs: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """The request's inputs with their rows repeated (or cut) to each bucket's size."""
    if not engine.signature(key).batched:
        yield inputs
        return
    for bucket in engine.manifest.batch_sizes:
        yield {
            name: np.resize(array, (bucket, *array.shape[1:])) if array.ndim else array
            for name, array in inputs.items()
        }


def warmup_requests(directory: Path) -> list[tuple[str, dict[str, np.ndarray]]]:
    """(signature key, inputs) of every warm-up request the servable carries."""
    extra = Path(directory) / WARMUP_DIR
    requests = []
    if (extra / TF_SERVING_WARMUP).is_file():
        requests += _from_prediction_logs(extra / TF_SERVING_WARMUP, directory)
    if (extra / KILN_WARMUP).is_file():
        requests += _from_json(extra / KILN_WARMUP, directory)
    return requests


def _from_json(path: Path, directory: Path) -> list[tuple[str, dict[str, np.ndarray]]]:
    import orjson

    from runtime.codecs.tfserving import decode_predict, read_predict
    from runtime.manifest import read_manifest

    try:
        bodies = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as e:
        raise ServableError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(bodies, list):
        raise ServableError(f"{path}: expected a list of TF Serving predict bodies")
    manifest = read_manifest(Path(directory))
    requests = []
    for index, body in enumerate(bodies):
        try:
            key, parsed = read_predict(orjson.dumps(body))
            if key not in manifest.signatures:
                raise ServableError(f"signature '{key}' not found; it has: {', '.join(sorted(manifest.signatures))}")
            requests.append((key, decode_predict(key, parsed, manifest.signatures[key]).inputs))
        except KilnError as e:
            raise ServableError(f"{path}: request {index}: {e}") from None
    return requests


def _from_prediction_logs(path: Path, directory: Path) -> list[tuple[str, dict[str, np.ndarray]]]:
    from runtime.codecs import examples
    from runtime.codecs.tensor_proto import to_ndarray
    from runtime.manifest import read_manifest
    from runtime.protos import generated_module

    PredictionLog = generated_module("kiln.warmup_pb2").PredictionLog
    signatures = read_manifest(Path(directory)).signatures
    requests = []
    for index, record in enumerate(read_records(path)):
        try:
            log = PredictionLog.FromString(record)
            kind = log.WhichOneof("log_type")
            if kind is None:
                raise ServableError(
                    "it is not a classify, regress, predict or multi-inference log "
                    "(session-run and streamed logs cannot be replayed)"
                )
            request = getattr(log, kind).request
            if kind == "predict_log":
                key = request.model_spec.signature_name or DEFAULT_SIGNATURE
                requests.append((key, {name: to_ndarray(t) for name, t in request.inputs.items()}))
                continue
            serialized = examples.from_input(request.input)
            tasks = (
                [(t.model_spec.signature_name, t.method_name) for t in request.tasks]
                if kind == "multi_inference_log"
                else [(request.model_spec.signature_name, examples.METHODS[kind.split("_")[0]])]
            )
            for key, method in tasks:
                key = key or DEFAULT_SIGNATURE
                if key not in signatures:
                    raise ServableError(f"signature '{key}' not found; it has: {', '.join(sorted(signatures))}")
                requests.append((key, {examples.check_method(key, signatures[key], method): serialized}))
        except Exception as e:  # a malformed record: a clear load failure, whatever broke
            raise ServableError(f"{path}: warm-up record {index}: {e}") from None
    return requests
