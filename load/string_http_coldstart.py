"""String signatures over HTTP (issue 17): cold start, a fresh process to its first 200 answer, of
`kiln serve` against a plain TensorFlow server, and what a string model adds to a CNN's start.

Method. Each run spawns the server and POSTs the request every 5 ms until a 200 comes back
(handler_coldstart.first_200); the time is spawn to that answer. Runs interleave the servers (a
noisy machine slows them alike); medians are reported.
- kiln serve: `python -m runtime.cli serve --model-config-file models.config --workers 1
  --grpc-port 0 --poll-seconds 0`, the config naming the one model.
- plain TensorFlow: PLAIN_TENSORFLOW below, a stdlib http.server that imports TensorFlow, loads
  the SavedModel with tf.saved_model.load before it listens, and answers the same bodies the way TF
  Serving's REST API does (classify/regress JSON examples made into tf.train.Example protos; predict
  over b64 serialized tf.Examples).
Cases: half_plus_two classify (classify_x_to_y) and regress (regress_x_to_y), wide_deep predict over
its tf.Example signature ("examples"). Target: Kiln at least 5x faster.

models.config: `kiln serve` over half_plus_two and digits (a CNN) against digits alone, both from a
models.config, to the first 200 of a digits predict (every configured model is loaded and warmed
before the server listens). Target: at most 10% slower.

    python load/string_http_coldstart.py [--runs 5] [--config-runs 11] [--out load/results]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from common import ROOT, example_servables, free_ports, write_results
from handler_coldstart import first_200

PLAIN_TENSORFLOW = '''
import base64, json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
import tensorflow as tf

port, model = int(sys.argv[1]), tf.saved_model.load(sys.argv[2])


def example(features):
    feature = {}
    for key, value in features.items():
        values = value if isinstance(value, list) else [value]
        if all(isinstance(v, int) for v in values):
            feature[key] = tf.train.Feature(int64_list=tf.train.Int64List(value=values))
        elif all(isinstance(v, (int, float)) for v in values):
            feature[key] = tf.train.Feature(float_list=tf.train.FloatList(value=values))
        else:
            feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode() for v in values]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        function = model.signatures[body.get("signature_name", "serving_default")]
        (name,) = function.structured_input_signature[1]
        if self.path.endswith(":predict"):
            protos = [base64.b64decode(instance["b64"]) for instance in body["instances"]]
            outputs = function(**{name: tf.constant(protos)})
            answer = {"predictions": next(iter(outputs.values())).numpy().tolist()}
        else:
            outputs = function(**{name: tf.constant([example(e) for e in body["examples"]])})
            if self.path.endswith(":regress"):
                answer = {"results": outputs["outputs"].numpy().reshape(-1).tolist()}
            else:
                answer = {"results": [[["", s] for s in row] for row in outputs["scores"].numpy().tolist()]}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


HTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''


def models_config(path: Path, servables: dict[str, Path]) -> Path:
    """A models.config (text format) naming each model at its base path (the servable as version 1)."""
    configs = []
    for name, servable in servables.items():
        base = path.parent / "models" / name
        if not base.exists():
            base.mkdir(parents=True)
            (base / "1").symlink_to(servable)
        configs.append(f'config {{ name: "{name}" base_path: "{base}" model_platform: "tensorflow" }}')
    path.write_text("model_config_list {\n  " + "\n  ".join(configs) + "\n}\n")
    return path


def kiln_command(config: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "runtime.cli", "serve", "--model-config-file", str(config), "--rest-port",
            str(port), "--grpc-port", "0", "--host", "127.0.0.1", "--poll-seconds", "0", "--workers", "1"]


def requests() -> dict[str, tuple[str, str, bytes]]:
    """Per case: the model, the REST path and the body (the same for both servers)."""
    from runtime.codecs.examples import serialize

    (wide_deep,) = serialize([{"item": "item_0007", "query": "red shoes", "dense": [1.0, 2.0, 3.0, 4.0]}])
    classify = {"signature_name": "classify_x_to_y", "examples": [{"x": 3.0}]}
    regress = {"signature_name": "regress_x_to_y", "examples": [{"x": 3.0}]}
    predict = {"signature_name": "examples", "instances": [{"b64": base64.b64encode(wide_deep).decode()}]}
    return {
        "half_plus_two:classify": ("half_plus_two", "/v1/models/half_plus_two:classify", json.dumps(classify).encode()),
        "half_plus_two:regress": ("half_plus_two", "/v1/models/half_plus_two:regress", json.dumps(regress).encode()),
        "wide_deep:examples (predict)": ("wide_deep", "/v1/models/wide_deep:predict", json.dumps(predict).encode()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--config-runs", type=int, default=11)
    parser.add_argument("--out", type=Path, default=ROOT / "load" / "results")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-string-http-"))
    built = example_servables(work / "built", ["half_plus_two", "wide_deep", "digits"])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    plain = work / "plain_tensorflow.py"
    plain.write_text(PLAIN_TENSORFLOW)
    results: dict = {"method": __doc__.split("\n\n")[1], "runs": args.runs, "http_cold_start": {},
                     "models_config": {}}

    for case, (model, path, body) in requests().items():
        config = models_config(work / f"{model}.config", {model: built[model].servable})
        times: dict[str, list[float]] = {"kiln": [], "tensorflow": []}
        for _ in range(args.runs):
            (port,) = free_ports(1)
            times["kiln"].append(first_200(kiln_command(config, port), port, path, body, env))
            (port,) = free_ports(1)
            command = [sys.executable, str(plain), str(port), str(built[model].saved_model)]
            times["tensorflow"].append(first_200(command, port, path, body, env))
        kiln, tensorflow = statistics.median(times["kiln"]), statistics.median(times["tensorflow"])
        results["http_cold_start"][case] = {
            "kiln_s": round(kiln, 3), "tensorflow_s": round(tensorflow, 3), "speedup": round(tensorflow / kiln, 2),
            "target_met": tensorflow / kiln >= 5, "runs": {k: [round(t, 3) for t in v] for k, v in times.items()}}
        print(json.dumps({case: results["http_cold_start"][case]}), flush=True)

    from runtime.engines import open_servable

    engine = open_servable(built["digits"].servable)
    spec = engine.signature("serving_default").inputs[0]
    engine.close()
    import numpy as np

    body = json.dumps({"instances": np.zeros((1, *spec.shape[1:]), spec.dtype).tolist()}).encode()
    digits, half_plus_two = built["digits"].servable, built["half_plus_two"].servable
    configs = {"digits": models_config(work / "digits.config", {"digits": digits}),
               "half_plus_two+digits": models_config(work / "both.config",
                                                     {"half_plus_two": half_plus_two, "digits": digits})}
    times = {name: [] for name in configs}
    for _ in range(args.config_runs):
        for name, config in configs.items():
            (port,) = free_ports(1)
            times[name].append(first_200(kiln_command(config, port), port, "/v1/models/digits:predict", body, env))
    alone, both = statistics.median(times["digits"]), statistics.median(times["half_plus_two+digits"])
    results["models_config"] = {"digits_alone_s": round(alone, 3), "half_plus_two_and_digits_s": round(both, 3),
                                "ratio": round(both / alone, 3), "target_met": both / alone <= 1.10,
                                "runs": {k: [round(t, 3) for t in v] for k, v in times.items()}}
    print(json.dumps({"models_config": results["models_config"]}), flush=True)
    write_results("string_http_coldstart", results, args.out)


if __name__ == "__main__":
    main()
