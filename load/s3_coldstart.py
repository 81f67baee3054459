"""Cold start from object storage: a fresh process to its first prediction, Kiln (`kiln coldstart
s3://...`: download into an empty cache, verify, load, warm up, predict) against plain TensorFlow
(download the SavedModel from the same store with boto3, `tf.saved_model.load`, predict), runs
alternating, medians and their ratio. The store is moto's server on loopback in its own process.

    python load/s3_coldstart.py SAVED_MODEL SERVABLE [--runs 3] [--signature serving_default]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, compile_bytecode, moto_server, write_results

BUCKET = "kiln-coldstart"
# The TensorFlow side, the download included; it prints the moment of its first prediction on
# time.perf_counter()'s clock (CLOCK_MONOTONIC, one for the machine), set against its spawning.
TENSORFLOW = """
import time
import os, sys, tempfile
import boto3
client, local = boto3.client("s3"), tempfile.mkdtemp()
for item in client.list_objects_v2(Bucket=sys.argv[1], Prefix="saved_model/")["Contents"]:
    dest = os.path.join(local, item["Key"][len("saved_model/"):])
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    client.download_file(sys.argv[1], item["Key"], dest)
import numpy as np
import tensorflow as tf
function = tf.saved_model.load(local).signatures[sys.argv[2]]
function(**{name: tf.zeros([1, *spec.shape[1:]], spec.dtype)
            for name, spec in function.structured_input_signature[1].items()})
print(time.perf_counter())
"""


def upload(client, source: Path, prefix: str) -> None:
    for path in sorted(source.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(source)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("saved_model", type=Path)
    parser.add_argument("servable", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--signature", default="serving_default")
    parser.add_argument("--out", type=Path, default=ROOT / "load" / "results")
    args = parser.parse_args()
    compile_bytecode()
    import boto3

    from warmpool.coldstart import measure

    kiln, tensorflow = [], []
    with moto_server():
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        upload(client, args.saved_model, "saved_model")
        upload(client, args.servable, "servables/model/1")
        for _ in range(args.runs):
            kiln.append(measure(f"s3://{BUCKET}/servables/model/1", signature=args.signature)["total_seconds"])
            spawned = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", TENSORFLOW, BUCKET, args.signature], capture_output=True,
                                  text=True, check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
            tensorflow.append(float(done.stdout.strip().splitlines()[-1]) - spawned)
    write_results("s3_coldstart", {
        "servable": str(args.servable), "saved_model": str(args.saved_model), "runs": args.runs,
        "kiln_seconds": kiln, "tensorflow_seconds": tensorflow,
        "kiln_median": statistics.median(kiln), "tensorflow_median": statistics.median(tensorflow),
        "ratio": statistics.median(kiln) / statistics.median(tensorflow)}, args.out)


if __name__ == "__main__":
    main()
