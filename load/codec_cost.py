"""Codec cost: the microseconds one request spends in Kiln's wire formats, for a batch of one
float32 image of 28x28x1 (the digits example) and of 224x224x3 (MobileNetV2): TensorFlow Serving's
REST JSON against its gRPC API against the Open Inference Protocol (OIP) over REST, as JSON and with
the binary tensor data extension, and over gRPC.

Why: at batch 1 a small model runs in a few hundred microseconds, so the codec can cost as much as
the model; this says how much, per protocol, and how many bytes each puts on the wire.

What is timed, on the server's side only (a client's own encoding is not counted):
  decode  request bytes -> the numpy arrays the engine takes, on what a client sends:
          tfserving_rest_json: as the server decodes the row-format body ({"instances":
            x.tolist()}: common.tfserving_requests): the numeric-rows fast path (simdjson), else
            tfserving.read_predict + decode_predict;
          tfserving_grpc: PredictRequest.FromString + tensor_proto.to_ndarray per input, on a
            PredictRequest with packed tensor_content (byte for byte what tf.make_tensor_proto
            writes: common.tfserving_requests);
          oip_rest_json: oip.read_infer, as App._infer calls it, on the body tritonclient.http sends
            with binary_data=False for the input and the requested output;
          oip_rest_binary: the same with tritonclient.http's default, binary_data=True: a JSON
            header, then the raw input (Inference-Header-Content-Length);
          oip_grpc: ModelInferRequest.FromString + oip_grpc.decode_infer, on what tritonclient.grpc
            sends (the data in raw_input_contents).
  encode  the outputs (float32 probabilities, 10 or 1000 per row) -> response bytes, as the
          server does: tfserving.encode_predict(row_format=True); a PredictResponse filled by
          tensor_proto.from_ndarray, serialized; oip.write_infer (JSON data, or binary when the
          request asks for it); oip_grpc.encode_infer, serialized (raw_output_contents).
  total   decode + encode of the same round.
Each figure is the median over rounds of the mean of a calibrated number of calls; the rounds go
through every (shape, protocol, phase) in turn, so a noisy neighbour slows them alike. Ratios are
against tfserving_grpc for the same shape and phase. Bytes are message bodies: HTTP headers and
HTTP/2 framing are not counted. Every protocol's decoding is checked to give back the input exactly.
The garbage collector runs, as in a server: row format's nested lists (813 per 28x28x1 image,
50,000 per 224x224x3) set off collections that are a large part of TF Serving JSON's decode.

    python load/codec_cost.py [--rounds 21] [--seconds 0.1] [--shapes 28x28x1,224x224x3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from common import ROOT, pyplot, tfserving_requests, write_results

from runtime.codecs import oip, oip_grpc, tensor_proto, tfserving
from runtime.manifest import Signature, TensorSpec
from runtime.protos import generated_module

MODEL, VERSION, KEY = "model", 1, "serving_default"
INPUT, OUTPUT = "images", "probabilities"
# Input shape (without the batch) -> outputs per row, as the example models have them.
OUTPUTS_PER_ROW = {(28, 28, 1): 10, (224, 224, 3): 1000}
PHASES = ("decode", "encode")
BASELINE = "tfserving_grpc"


@dataclass(frozen=True)
class Case:
    """One protocol on one shape: the wire bytes each way and the server's two codec steps."""

    request: bytes
    decode: Callable[[], dict[str, np.ndarray]]
    encode: Callable[[], bytes]


def tfserving_json(signature: Signature, inputs: dict, outputs: dict) -> Case:
    body, _ = tfserving_requests(MODEL, inputs, KEY)

    def decode():  # as App._predict does: the numeric-rows fast path, else the general parse
        text = tfserving.instances_text(body)
        fast = tfserving.fast_predict(text, signature) if text is not None else None
        if fast is not None:
            return fast.inputs
        name, parsed = tfserving.read_predict(body)
        return tfserving.decode_predict(name, parsed, signature).inputs

    return Case(body, decode, lambda: tfserving.encode_predict(outputs, row_format=True))


def tfserving_grpc(signature: Signature, inputs: dict, outputs: dict) -> Case:
    predict = generated_module("tensorflow_serving.apis.predict_pb2")
    body = tfserving_requests(MODEL, inputs, KEY)[1].SerializeToString()

    def decode():
        parsed = predict.PredictRequest.FromString(body)
        return {name: tensor_proto.to_ndarray(tensor) for name, tensor in parsed.inputs.items()}

    def encode():  # as handlers.grpc.tfserving's PredictionService._predict builds its answer
        response = predict.PredictResponse()
        response.model_spec.name = MODEL
        response.model_spec.version.value = VERSION
        response.model_spec.signature_name = KEY
        for name, array in outputs.items():
            tensor_proto.from_ndarray(array, response.outputs[name])
        return response.SerializeToString()

    return Case(body, decode, encode)


def oip_json(signature: Signature, inputs: dict, outputs: dict) -> Case:
    # What tritonclient.http's InferInput.set_data_from_numpy(binary_data=False) and
    # InferRequestedOutput(binary_data=False) send: the data flat, as Python floats (the same JSON;
    # its rapidjson writes a few exponents differently, 19 bytes in 2.9 MB at 224x224x3).
    body = orjson.dumps({
        "inputs": [{"name": name, "shape": list(array.shape), "datatype": oip.datatype(array.dtype.name),
                    "data": array.ravel().tolist()} for name, array in inputs.items()],
        "outputs": [{"name": name, "parameters": {"binary_data": False}} for name in outputs]})
    return _oip_rest(signature, body, None, outputs)


def oip_binary(signature: Signature, inputs: dict, outputs: dict) -> Case:
    # tritonclient.http's default: binary_data=True for inputs and outputs, the JSON header's
    # length in the Inference-Header-Content-Length header.
    header = orjson.dumps({
        "inputs": [{"name": name, "shape": list(array.shape), "datatype": oip.datatype(array.dtype.name),
                    "parameters": {"binary_data_size": array.nbytes}} for name, array in inputs.items()],
        "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in outputs]})
    body = b"".join([header, *(array.tobytes() for array in inputs.values())])
    return _oip_rest(signature, body, str(len(header)), outputs)


def _oip_rest(signature: Signature, body: bytes, header_length: str | None, outputs: dict) -> Case:
    """As App._infer reads a request and writes its answer."""
    request = oip.read_infer(body, signature, header_length)
    return Case(body, lambda: oip.read_infer(body, signature, header_length).inputs,
                lambda: oip.write_infer(MODEL, VERSION, outputs, request)[0])


def oip_grpc_case(signature: Signature, inputs: dict, outputs: dict) -> Case:
    # What tritonclient.grpc sends: every input's data in raw_input_contents.
    service = generated_module("grpc_service_pb2")
    request = service.ModelInferRequest(model_name=MODEL)
    for name, array in inputs.items():
        request.inputs.add(name=name, datatype=oip.datatype(array.dtype.name), shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    body = request.SerializeToString()

    def decode():  # as handlers.grpc.oip's ModelInfer
        return oip_grpc.decode_infer(service.ModelInferRequest.FromString(body), signature)[0]

    return Case(body, decode,
                lambda: oip_grpc.encode_infer(MODEL, VERSION, outputs, list(outputs), "").SerializeToString())


PROTOCOLS: dict[str, Callable[[Signature, dict, dict], Case]] = {
    "tfserving_rest_json": tfserving_json, "tfserving_grpc": tfserving_grpc, "oip_rest_json": oip_json,
    "oip_rest_binary": oip_binary, "oip_grpc": oip_grpc_case}


def microseconds(call: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls * 1e6


def calibrate(call: Callable[[], object], seconds: float) -> int:
    """How many calls take about `seconds` (after one call to warm up)."""
    call()
    once = microseconds(call, 3) / 1e6
    return max(1, round(seconds / once))


def cases_for(shape: tuple[int, ...], rng: np.random.Generator) -> dict[str, Case]:
    width = OUTPUTS_PER_ROW.get(shape, 10)
    signature = Signature(engine="saved-model",
                          inputs=(TensorSpec(name=INPUT, dtype="float32", shape=(None, *shape)),),
                          outputs=(TensorSpec(name=OUTPUT, dtype="float32", shape=(None, width)),))
    inputs = {INPUT: rng.random((1, *shape), dtype=np.float32)}
    outputs = {OUTPUT: rng.random((1, width), dtype=np.float32)}
    cases = {name: build(signature, inputs, outputs) for name, build in PROTOCOLS.items()}
    for name, case in cases.items():  # what is timed must be right
        decoded = case.decode()
        assert decoded.keys() == inputs.keys(), name
        np.testing.assert_array_equal(decoded[INPUT], inputs[INPUT], err_msg=name)
        assert decoded[INPUT].dtype == np.float32, name
    return cases


def measure(shapes: list[tuple[int, ...]], rounds: int, seconds: float) -> dict:
    rng = np.random.default_rng(0)
    cases = {shape: cases_for(shape, rng) for shape in shapes}
    steps = [(shape, protocol, phase, getattr(case, phase))
             for shape, by_protocol in cases.items() for protocol, case in by_protocol.items() for phase in PHASES]
    calls = {step[:3]: calibrate(step[3], seconds) for step in steps}
    samples: dict[tuple, list[float]] = {step[:3]: [] for step in steps}
    for _ in range(rounds):
        for shape, protocol, phase, call in steps:
            samples[shape, protocol, phase].append(microseconds(call, calls[shape, protocol, phase]))
    results = {}
    for shape, by_protocol in cases.items():
        rows = {}
        for protocol, case in by_protocol.items():
            decode, encode = samples[shape, protocol, "decode"], samples[shape, protocol, "encode"]
            rows[protocol] = {"decode_us": statistics.median(decode), "encode_us": statistics.median(encode),
                              "total_us": statistics.median(d + e for d, e in zip(decode, encode)),
                              "request_bytes": len(case.request), "response_bytes": len(case.encode()),
                              "calls_per_round": {"decode": calls[shape, protocol, "decode"],
                                                  "encode": calls[shape, protocol, "encode"]}}
        for row in rows.values():
            for key in ("decode", "encode", "total"):
                row[f"{key}_vs_grpc"] = row[f"{key}_us"] / rows[BASELINE][f"{key}_us"]
            row["wire_bytes_vs_grpc"] = ((row["request_bytes"] + row["response_bytes"])
                                         / (rows[BASELINE]["request_bytes"] + rows[BASELINE]["response_bytes"]))
        results[label(shape)] = {"input_shape": [1, *shape], "output_shape": [1, OUTPUTS_PER_ROW.get(shape, 10)],
                                 "protocols": rows}
        for protocol, row in rows.items():
            print(label(shape), protocol, {k: round(v, 2) for k, v in row.items() if isinstance(v, float)}, flush=True)
    return results


def label(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("x"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="28x28x1,224x224x3", help="input shapes without the batch")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--seconds", type=float, default=0.1, help="per round and step")
    parser.add_argument("--out", type=Path, default=ROOT / "load" / "results")
    args = parser.parse_args()
    from google.protobuf.internal import api_implementation

    results = {"rounds": args.rounds, "seconds_per_step": args.seconds,
               "protobuf_backend": api_implementation.Type(), "baseline": BASELINE,
               "shapes": measure([parse_shape(s) for s in args.shapes.split(",")], args.rounds, args.seconds)}
    write_results("codec_cost", results, args.out)
    plot(results, args.out / "codec_cost.png")


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    shapes = results["shapes"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 5), squeeze=False)
    keys = ("decode", "encode", "total")
    for ax, (shape, row) in zip(axes[0], shapes.items()):
        protocols = list(row["protocols"])
        width = 0.8 / len(protocols)
        for i, protocol in enumerate(protocols):
            values = row["protocols"][protocol]
            bars = ax.bar([x + i * width for x in range(len(keys))], [values[f"{k}_us"] for k in keys], width,
                          label=f"{protocol} ({(values['request_bytes'] + values['response_bytes']) / 1e3:,.1f} kB)")
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks([x + width * (len(protocols) - 1) / 2 for x in range(len(keys))], keys)
        ax.set_yscale("log")
        ax.set_ylabel("µs per request (median)")
        ax.set_title(f"batch 1, float32 {shape} in, {row['output_shape'][1]} out")
        ax.legend(fontsize=8, title="protocol (request + response bytes)", title_fontsize=8, loc="upper center",
                  bbox_to_anchor=(0.5, -0.08), ncol=len(protocols) if len(protocols) < 4 else 2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
