"""Spark's predict_batch_udf over a Kiln servable, in local[2] on loopback (Java from Debian's
packages, installed by make setup): every prediction as the engine gives it, the bad rows (one
short, one null) in the error field, no TensorFlow in the Python workers."""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest

from tests.conftest import ROOT
from tests.scoring_rows import ROWS, check_scored, digit_rows, engine_module

pyspark = engine_module("pyspark")

from runtime.integrations.spark import make_predict_fn, predict_udf, return_type  # noqa: E402

pytestmark = pytest.mark.skipif(not shutil.which("java") and not os.environ.get("CI"),
                                reason="Spark needs Java (make setup installs it)")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return digit_rows(tmp_path_factory)


@pytest.fixture(scope="module")
def spark():
    from pyspark.sql import SparkSession

    os.environ["PYSPARK_PYTHON"] = sys.executable  # the workers: this Python, this checkout
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    session = (SparkSession.builder.master("local[2]").appName("kiln-tests")
               .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
               .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "2")
               .config("spark.sql.execution.arrow.pyspark.enabled", "true").getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def frame(spark, rows):
    import pandas as pd

    return spark.createDataFrame(pd.DataFrame({"id": np.arange(ROWS), "image": rows.flat_values()}),
                                 "id long, image array<float>")


def test_predict_udf_scores_every_row_and_reports_bad_ones(rows, spark):
    score = predict_udf(rows.servable, batch_size=32)
    out = (frame(spark, rows).withColumn("p", score("image"))
           .select("id", "p.probabilities", "p.error").orderBy("id").toPandas())
    check_scored(rows, np.stack(out["probabilities"].to_numpy()), [e if isinstance(e, str) else None
                                                                   for e in out["error"]])


def test_the_workers_never_import_tensorflow(rows, spark):
    score = predict_udf(rows.servable, batch_size=32)
    frame(spark, rows).withColumn("p", score("image")).select("p.error").collect()
    loaded = spark.sparkContext.parallelize(range(4), 2).map(lambda _: "tensorflow" in sys.modules).collect()
    assert loaded == [False] * 4


def test_make_predict_fn_with_predict_batch_udf_directly(rows, spark):
    """The plain factory: Spark converts the tensor column itself, so the rows must all be good."""
    from pyspark.ml.functions import predict_batch_udf

    udf = predict_batch_udf(make_predict_fn(str(rows.servable), checked_by_kiln=False),
                            return_type=return_type(rows.servable), batch_size=32,
                            input_tensor_shapes=[[28, 28, 1]])
    good = frame(spark, rows).where("id >= 8 and id < 200")
    out = good.withColumn("p", udf("image")).select("id", "p.probabilities").orderBy("id").toPandas()
    np.testing.assert_allclose(np.stack(out["probabilities"].to_numpy()), rows.expected[8:200], rtol=1e-5, atol=1e-6)
