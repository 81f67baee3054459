"""Batch scoring inside other engines: rows/s of the digits example through Ray Data, Spark and Beam
with Kiln's adapters (runtime/integrations/), against the engine called directly on the same rows
at batch 32, and against each engine running the SavedModel with TensorFlow (the users' alternative).

Each engine gets this machine's CPUs: Ray a local instance with 2 actors of 1 CPU, Spark local[2]
(two Python workers, spark.task.cpus 1), Beam the DirectRunner. Kiln's workers use the threads their
engine gives them (1 each); the engine alone runs in one process with its default threads; TensorFlow
with its own defaults, as users would run it. A job in an engine pays a fixed start (actors or Python
workers started, the model opened) and then a rate per row; a table of millions of rows sees only the
rate. So each engine's job runs, after an uncounted warm-up, on --rows and on SCALE times as many: the
rate is the slope between the two (rows/s at steady state), the start the intercept; the whole job's
rate at --rows is kept beside them. The engine alone is the median of --rounds. One more pair of lines,
on one thread in this process, gives the adapters' own cost: the engine against Scorer.score on the
same rows as Ray and Spark hand them over (an array a row). Ray and Spark should reach TARGET of the
engine alone at steady state. Beam runs in its own venv (apache-beam pins pillow and pyarrow below this
environment's) and on fewer rows: the DirectRunner is not built for speed. The load average is
recorded: on a shared machine, compare only within one run.

    python load/distributed_scoring.py [--rows 20000] [--beam-rows 4000] [--rounds 3] [--out load/results]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, example_servables, pyplot, write_results

KEY = "serving_default"
BATCH = 32
TARGET = 0.7
SCALE = 4  # the larger job's rows, in multiples of --rows


def digits_rows(count: int):
    import numpy as np

    from examples.digits import load_images

    images, _ = load_images()
    return images[np.arange(count) % len(images)]


def timed(job, rows: int) -> float:
    """Rows/s of job() after one uncounted warm-up run."""
    job()
    started = time.perf_counter()
    job()
    return rows / (time.perf_counter() - started)


def seconds(job) -> float:
    started = time.perf_counter()
    job()
    return time.perf_counter() - started


def job_rates(make_job, x) -> dict:
    """A job's steady rate (the slope of its time over rows), its start (the intercept) and its
    whole rate at len(x) rows, from jobs on x and on SCALE copies of x, each after a warm-up."""
    import numpy as np

    small, large = make_job(x), make_job(np.concatenate([x] * SCALE))
    small()
    large()
    t_small, t_large = seconds(small), seconds(large)
    rate = (SCALE - 1) * len(x) / max(t_large - t_small, 1e-9)
    return {"steady": rate, "start_s": round(max(t_small - len(x) / rate, 0.0), 2), "whole_job": len(x) / t_small}


def direct_rates(servable: Path, saved_model: Path, x, rounds: int) -> dict:
    """The engine alone (its default threads), TensorFlow alone, and on one thread the engine and
    the adapters' core (Scorer.score over rows as Ray and Spark hand them over): Kiln's own cost."""
    import numpy as np

    from runtime.engines.base import Engine
    from runtime.engines.saved_model import load_saved_model

    from runtime.integrations.core import Scorer

    engine = Engine.open(servable)
    signature = load_saved_model(saved_model).signatures[KEY]
    scorer = Scorer(Engine.open(servable, threads=1))
    flat = np.empty(len(x), dtype=object)
    flat[:] = list(x.reshape(len(x), -1))  # as Ray and Spark hand over a list column: an array a row
    import tensorflow as tf

    def kiln():
        for start in range(0, len(x), BATCH):
            engine.run(KEY, {"images": x[start:start + BATCH]})

    def engine_one_thread():
        for start in range(0, len(x), BATCH):
            scorer.engine.run(KEY, {"images": x[start:start + BATCH]})

    def adapter_one_thread():
        for start in range(0, len(x), BATCH):
            scorer.score({"images": flat[start:start + BATCH]})

    def tensorflow():
        for start in range(0, len(x), BATCH):
            signature(images=tf.constant(x[start:start + BATCH]))

    jobs = {"kiln": kiln, "tensorflow": tensorflow, "kiln_engine_1_thread": engine_one_thread,
            "kiln_adapter_1_thread": adapter_one_thread}
    return {name: statistics.median(timed(job, len(x)) for _ in range(rounds)) for name, job in jobs.items()}


class TensorFlowPredictor:
    """What a Ray user writes without Kiln: the SavedModel in TensorFlow, in every actor."""

    def __init__(self, saved_model: str):
        from runtime.engines.saved_model import load_saved_model

        self.signature = load_saved_model(Path(saved_model)).signatures[KEY]

    def __call__(self, batch):
        return {"probabilities": self.signature(images=batch["data"])["probabilities"].numpy()}


def ray_rates(servable: Path, saved_model: Path, x) -> dict:
    import ray

    from runtime.integrations.ray_data import KilnPredictor

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        jobs = {"kiln": (KilnPredictor, (str(servable),), {"columns": {"images": "data"}, "keep_columns": False}),
                "tensorflow": (TensorFlowPredictor, (str(saved_model),), {})}

        def maker(cls, args, kwargs):
            def make_job(rows):
                data = ray.data.from_numpy(rows).repartition(2).materialize()  # column "data"; a block an actor
                pool = ray.data.ActorPoolStrategy(size=2)
                return lambda: data.map_batches(cls, fn_constructor_args=args, fn_constructor_kwargs=kwargs,
                                                batch_size=BATCH, compute=pool).materialize()
            return make_job

        return {name: job_rates(maker(*job), x) for name, job in jobs.items()}
    finally:
        ray.shutdown()


def tensorflow_predict_fn(saved_model: str):
    """What a Spark user writes without Kiln: predict_batch_udf's factory loading TensorFlow."""
    def make():
        from runtime.engines.saved_model import load_saved_model

        signature = load_saved_model(Path(saved_model)).signatures[KEY]
        return lambda images: signature(images=images)["probabilities"].numpy()
    return make


def spark_rates(servable: Path, saved_model: Path, x) -> dict:
    import pandas as pd
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql import SparkSession
    from pyspark.sql.types import ArrayType, FloatType

    from runtime.integrations.spark import predict_udf

    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    spark = (SparkSession.builder.master("local[2]").config("spark.driver.host", "127.0.0.1")
             .config("spark.driver.bindAddress", "127.0.0.1").config("spark.ui.enabled", "false")
             .config("spark.sql.execution.arrow.pyspark.enabled", "true")
             .config("spark.driver.memory", "4g").getOrCreate())  # the larger job's rows pass through it
    spark.sparkContext.setLogLevel("ERROR")
    try:
        tensorflow = predict_batch_udf(tensorflow_predict_fn(str(saved_model)), return_type=ArrayType(FloatType()),
                                       batch_size=BATCH, input_tensor_shapes=[[28, 28, 1]])
        columns = {"kiln": predict_udf(servable, batch_size=BATCH)("image"), "tensorflow": tensorflow("image")}

        def maker(column):
            def make_job(rows):
                frame = spark.createDataFrame(pd.DataFrame({"image": list(rows.reshape(len(rows), -1))}),
                                              "image array<float>").repartition(2).cache()
                frame.count()
                return lambda: frame.select(column).write.format("noop").mode("overwrite").save()
            return make_job

        return {name: job_rates(maker(column), x) for name, column in columns.items()}
    finally:
        spark.stop()


def beam_rates(servable: Path, saved_model: Path, count: int) -> dict:
    """In the beam venv (this script run again with --beam-only): Beam's numbers as JSON on stdout."""
    from tests.engine_venv import engine_python

    python = engine_python("beam")
    run = subprocess.run([str(python), __file__, "--beam-only", str(servable), str(saved_model), str(count)],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(run.stdout.strip().splitlines()[-1])


def beam_only(servable: str, saved_model: str, count: int) -> None:
    import apache_beam as beam
    import numpy as np
    from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

    from runtime.integrations.beam import KilnModelHandler

    class TensorFlowHandler(ModelHandler):
        """What a Beam user writes without Kiln: the SavedModel in TensorFlow."""

        def load_model(self):
            from runtime.engines.saved_model import load_saved_model

            return load_saved_model(Path(saved_model)).signatures[KEY]

        def run_inference(self, batch, model, inference_args=None):
            out = model(images=np.stack(batch))["probabilities"].numpy()
            return [PredictionResult(example, row) for example, row in zip(batch, out)]

        def batch_elements_kwargs(self):
            return {"min_batch_size": BATCH, "max_batch_size": BATCH}

    def maker(handler):
        def make_job(rows):
            def job():
                with beam.Pipeline() as pipeline:
                    _ = pipeline | beam.Create(list(rows)) | RunInference(handler) | beam.combiners.Count.Globally()
            return job
        return make_job

    x = digits_rows(count)
    handlers = {"kiln": KilnModelHandler(servable), "tensorflow": TensorFlowHandler()}
    print(json.dumps({name: job_rates(maker(handler), x) for name, handler in handlers.items()}))


def main() -> None:
    if sys.argv[1:2] == ["--beam-only"]:
        sys.path.insert(0, str(ROOT))
        return beam_only(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--beam-rows", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "load" / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        example = example_servables(Path(scratch), ["digits"])["digits"]
        x = digits_rows(args.rows)
        engines = {"direct": direct_rates(example.servable, example.saved_model, x, args.rounds),
                   "ray": ray_rates(example.servable, example.saved_model, x),
                   "spark": spark_rates(example.servable, example.saved_model, x),
                   "beam": beam_rates(example.servable, example.saved_model, args.beam_rows)}
    direct = engines.pop("direct")
    steady = {name: {kind: rates[kind]["steady"] for kind in rates} for name, rates in engines.items()}
    ratio = {name: round(rates["kiln"] / direct["kiln"], 3) for name, rates in steady.items()}
    results = {
        "model": "digits", "batch": BATCH, "rows": args.rows, "scale": SCALE, "beam_rows": args.beam_rows,
        "cpus": os.cpu_count(), "load_average": round(os.getloadavg()[0], 2),
        "rows_per_second": {"direct": {kind: round(rate) for kind, rate in direct.items()},
                            **{name: {kind: round(rate) for kind, rate in rates.items()}
                               for name, rates in steady.items()}},
        "start_seconds": {name: {kind: rates[kind]["start_s"] for kind in rates} for name, rates in engines.items()},
        "whole_job_rows_per_second": {name: {kind: round(rates[kind]["whole_job"]) for kind in rates}
                                      for name, rates in engines.items()},
        "kiln_vs_engine_alone": ratio,
        "kiln_whole_job_vs_engine_alone": {name: round(rates["kiln"]["whole_job"] / direct["kiln"], 3)
                                           for name, rates in engines.items()},
        "adapter_vs_engine_1_thread": round(direct["kiln_adapter_1_thread"] / direct["kiln_engine_1_thread"], 3),
        "kiln_vs_tensorflow_in_same_engine": {"direct": round(direct["kiln"] / direct["tensorflow"], 3),
                                              **{name: round(rates["kiln"] / rates["tensorflow"], 3)
                                                 for name, rates in steady.items()}},
        "target": {"ray_and_spark_vs_engine_alone": TARGET,
                   "met": all(ratio[name] >= TARGET for name in ("ray", "spark"))},
    }
    path = write_results("distributed_scoring", results, args.out)
    plot(results, path.with_suffix(".png"))


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    names = list(results["rows_per_second"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.38
    for offset, (kind, color) in enumerate((("kiln", "tab:orange"), ("tensorflow", "tab:blue"))):
        values = [results["rows_per_second"][name][kind] for name in names]
        bars = ax.bar([i + (offset - 0.5) * width for i in range(len(names))], values, width, label=kind, color=color)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    direct = results["rows_per_second"]["direct"]["kiln"]
    ax.axhline(direct * TARGET, color="gray", linestyle="--", label=f"{TARGET}x the engine alone")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("rows/s (steady state)")
    ax.set_title(f"digits, batch {results['batch']}: Kiln vs TensorFlow inside each engine")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
