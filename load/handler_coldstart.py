"""Cold start of each entry point: a fresh process to its first answered prediction, Kiln's
against a plain handler that imports TensorFlow and loads the SavedModel, side by side.

Over HTTP (process spawn to the first 200 to a predict POST, polled every 5 ms):
  kiln serve              `python -m runtime.cli serve` (REST and gRPC, adaptive batching)
  Cloud Run handler       `functions-framework --asgi --source handlers/cloud_run.py --target serve`
  plain functions-framework + TensorFlow: a function that imports TensorFlow, loads the SavedModel at
                          import and answers the same predict body
In a fresh interpreter (the Lambda service itself cannot run here: its init and one invocation are
simulated by calling the handler as the Lambda runtime would, with an API Gateway HTTP API event):
  Lambda handler          handlers.aws_lambda.handler
  plain Lambda + TensorFlow: a module that imports TensorFlow and loads the SavedModel at init

Runs interleave the entry points (a noisy machine slows them alike); medians are reported, with the
speedups against the TensorFlow handlers. Targets (digits CNN): Kiln at least 10x faster than the
plain TensorFlow handler, and under 0.5 s.

    python load/handler_coldstart.py [--runs 5] [--models digits]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, compile_bytecode, example_servables, free_ports, pyplot, write_results

PLAIN_FUNCTION = '''
import json
import functions_framework

MODEL = None


def model():
    # TensorFlow is imported and the SavedModel loaded in the serving process, on the first request:
    # functions-framework imports the source in gunicorn's master and forks, and TensorFlow's thread
    # pools do not survive a fork.
    global MODEL
    if MODEL is None:
        import tensorflow as tf

        function = tf.saved_model.load({saved_model!r}).signatures["serving_default"]
        name, spec = next(iter(function.structured_input_signature[1].items()))
        MODEL = tf, function, name, spec
    return MODEL


@functions_framework.http
def predict(request):
    import numpy as np

    tf, function, name, spec = model()
    instances = np.asarray(request.get_json()["instances"], dtype=spec.dtype.as_numpy_dtype)
    outputs = function(**{{name: tf.constant(instances)}})
    return json.dumps({{"predictions": next(iter(outputs.values())).numpy().tolist()}})
'''
LAMBDA_KILN = '''
import json, sys, time
start = float(sys.argv[1])
from handlers import aws_lambda
event = json.loads(sys.argv[2])
class Context:
    aws_request_id = "cold-start"
    function_name = "kiln"
    memory_limit_in_mb = 2048
    invoked_function_arn = "arn:aws:lambda:us-east-1:000000000000:function:kiln"
    def get_remaining_time_in_millis(self):
        return 30000
answer = aws_lambda.handler(event, Context())
assert answer["statusCode"] == 200, answer
print(time.time() - start, flush=True)
'''
LAMBDA_TENSORFLOW = '''
import json, sys, time
start = float(sys.argv[1])
import numpy as np
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[3])
function = loaded.signatures["serving_default"]
name, spec = next(iter(function.structured_input_signature[1].items()))
def handler(event, context):
    instances = np.asarray(json.loads(event["body"])["instances"], dtype=spec.dtype.as_numpy_dtype)
    outputs = function(**{name: tf.constant(instances)})
    return {"statusCode": 200, "body": json.dumps({"predictions": next(iter(outputs.values())).numpy().tolist()})}
answer = handler(json.loads(sys.argv[2]), None)
assert answer["statusCode"] == 200
print(time.time() - start, flush=True)
'''


def first_200(command: list[str], port: int, path: str, body: bytes, env: dict, timeout: float = 120) -> float:
    """Seconds from spawning `command` to the first 200 answer to POST path on port."""
    log = tempfile.TemporaryFile()  # not a pipe: a pipe nobody reads would stall the server's logging
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                connection.close()
                if response.status == 200:
                    return time.perf_counter() - start
            except (ConnectionError, http.client.HTTPException, OSError):
                pass
            if child.poll() is not None or time.perf_counter() - start > timeout:
                child.kill()
                log.seek(0)
                raise RuntimeError(f"{command[:4]} did not answer: {log.read().decode(errors='replace')[-2000:]}")
            time.sleep(0.005)
    finally:
        child.terminate()
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
        log.close()


def in_process(code: str, *args: str, env: dict) -> float:
    """Seconds from spawning an interpreter to the answer it prints (its own clock, the wall time)."""
    started = time.time()
    done = subprocess.run([sys.executable, "-c", code, str(started), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--models", default="digits")
    parser.add_argument("--out", type=Path, default=ROOT / "load" / "results")
    args = parser.parse_args()
    compile_bytecode()
    work = Path(tempfile.mkdtemp(prefix="kiln-handler-coldstart-"))
    results = {"runs": args.runs, "models": {}}
    for name, example in example_servables(work / "models", args.models.split(",")).items():
        repository = work / "models"
        import numpy as np

        from runtime.engines import open_servable

        engine = open_servable(example.servable)
        spec = engine.signature("serving_default").inputs[0]
        engine.close()
        body = json.dumps({"instances": np.zeros((1, *spec.shape[1:]), spec.dtype).tolist()}).encode()
        event = json.dumps({"version": "2.0", "routeKey": "$default", "rawPath": f"/v1/models/{name}:predict",
                            "rawQueryString": "", "headers": {"content-type": "application/json"},
                            "requestContext": {"http": {"method": "POST", "path": f"/v1/models/{name}:predict",
                                                        "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1"},
                                               "requestId": "cold", "stage": "$default"},
                            "body": body.decode(), "isBase64Encoded": False})
        plain = work / f"plain_{name}.py"
        plain.write_text(PLAIN_FUNCTION.format(saved_model=str(example.saved_model)))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3",
               "KILN_MODEL_REPOSITORY": str(repository), "KILN_MODEL_NAME": name, "KILN_SERVABLE_CACHE": str(work / "cache"),
               "POWERTOOLS_TRACE_DISABLED": "true", "POWERTOOLS_METRICS_NAMESPACE": "Kiln"}
        runs: dict[str, list[float]] = {key: [] for key in (
            "kiln_serve", "cloud_run_handler", "plain_functions_framework_tensorflow", "lambda_handler",
            "plain_lambda_tensorflow")}
        path = f"/v1/models/{name}:predict"
        for _ in range(args.runs):
            rest, grpc = free_ports(2)
            runs["kiln_serve"].append(first_200(
                [sys.executable, "-m", "runtime.cli", "serve", "--rest-port", str(rest), "--grpc-port", str(grpc),
                 "--host", "127.0.0.1", "--poll-seconds", "0", "--workers", "1"], rest, path, body, env))
            (port,) = free_ports(1)
            runs["cloud_run_handler"].append(first_200(
                ["functions-framework", "--asgi", "--source", "handlers/cloud_run.py", "--target", "serve",
                 "--port", str(port), "--host", "127.0.0.1"], port, path, body, env))
            (port,) = free_ports(1)
            runs["plain_functions_framework_tensorflow"].append(first_200(
                ["functions-framework", "--source", str(plain), "--target", "predict", "--port", str(port),
                 "--host", "127.0.0.1"], port, "/", body, env))
            runs["lambda_handler"].append(in_process(LAMBDA_KILN, event, env=env))
            runs["plain_lambda_tensorflow"].append(in_process(LAMBDA_TENSORFLOW, event, str(example.saved_model), env=env))
        row = {key: statistics.median(values) for key, values in runs.items()}
        row["all_runs"] = runs
        row["speedup_http_kiln_serve"] = row["plain_functions_framework_tensorflow"] / row["kiln_serve"]
        row["speedup_http_cloud_run"] = row["plain_functions_framework_tensorflow"] / row["cloud_run_handler"]
        row["speedup_lambda"] = row["plain_lambda_tensorflow"] / row["lambda_handler"]
        row["targets_met"] = {key: row[key] < 0.5 and speedup >= 10 for key, speedup in (
            ("kiln_serve", row["speedup_http_kiln_serve"]), ("cloud_run_handler", row["speedup_http_cloud_run"]),
            ("lambda_handler", row["speedup_lambda"]))}
        results["models"][name] = row
    write_results("handler_coldstart", results, args.out)
    plot(results, args.out / "handler_coldstart.png")


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    keys = ["kiln_serve", "cloud_run_handler", "lambda_handler", "plain_functions_framework_tensorflow",
            "plain_lambda_tensorflow"]
    figure, axes = plt.subplots(figsize=(9, 4))
    for index, (name, row) in enumerate(results["models"].items()):
        axes.barh([f"{name}: {key}" for key in keys], [row[key] for key in keys])
    axes.axvline(0.5, color="grey", linewidth=0.5)
    axes.set(xlabel="fresh process to first answered prediction (s, median)", xscale="log")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
