"""Apache Spark: pyspark.ml.functions.predict_batch_udf over a Kiln servable.

    score = predict_udf("s3://models/digits/1", batch_size=32)
    df.withColumn("p", score("image")).select("p.probabilities", "p.error")

make_predict_fn is the factory predict_batch_udf calls once per Python worker (Spark caches what
it returns): it opens the servable there with spark.task.cpus threads. The UDF returns a struct of
one field per output (a scalar per row for an output of shape [-1], else a flat array) and an
`error` field: null for a scored row, the reason for a bad one, whose outputs are a fill (NaN for
floats). A bad row never fails the job.

Spark's own conversion of tensor columns (np.vstack, then a reshape to input_tensor_shapes) fails
the whole task on one null or wrongly sized row, before any predict function sees it. So
predict_udf passes Kiln each column's rows as they are (an input_tensor_shapes entry of None), with
one constant column more so that even a one-input signature takes Spark's multi-column path; Kiln
then checks each row and reshapes flat rows itself. make_predict_fn(..., checked_by_kiln=False)
gives a plain predict function for calling predict_batch_udf directly, Spark's conversion included.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from runtime.codecs.tfserving import DEFAULT_SIGNATURE
from runtime.errors import ConfigError
from runtime.integrations.core import Scorer, batched_signature, read_servable_manifest
from runtime.manifest import TensorSpec

ERROR_FIELD = "error"
# numpy dtype -> Spark SQL type name; predict_batch_udf takes no booleans, so they become bytes.
SPARK_TYPES = {
    "float32": "FloatType",
    "float64": "DoubleType",
    "int8": "ByteType",
    "uint8": "ShortType",
    "int16": "ShortType",
    "int32": "IntegerType",
    "int64": "LongType",
    "bool": "ByteType",
    "string": "StringType",
}
NUMPY_TYPES = {
    "FloatType": np.float32,
    "DoubleType": np.float64,
    "ByteType": np.int8,
    "ShortType": np.int16,
    "IntegerType": np.int32,
    "LongType": np.int64,
}


def make_predict_fn(
    servable: str | os.PathLike,
    signature: str = DEFAULT_SIGNATURE,
    *,
    threads: int | None = None,
    checked_by_kiln: bool = True,
) -> Callable[[], Callable[..., dict[str, np.ndarray]]]:
    """predict_batch_udf's make_predict_fn: opens the servable in the worker, once per process.
    Its predict function takes one array per input in the signature's order (and, when
    checked_by_kiln, the constant column predict_udf adds) and returns the struct's fields."""

    def make() -> Callable[..., dict[str, np.ndarray]]:
        scorer = Scorer.open(servable, signature, threads=threads or _task_cpus())
        return _Predict(scorer, len(scorer.input_names) + (1 if checked_by_kiln else 0))  # predict_udf's constant

    return make


class _Predict:
    """A worker's predict function: the struct's fields of a batch of rows."""

    def __init__(self, scorer: Scorer, columns: int):
        self.scorer = scorer
        self.fields = {spec.name: _spark_type(spec) for spec in scorer.signature.outputs}
        # Spark counts the predict function's parameters to decide how to pass the columns.
        self.__signature__ = inspect.Signature(
            [inspect.Parameter(f"p{i}", inspect.Parameter.POSITIONAL_ONLY) for i in range(columns)]
        )

    def __call__(self, *columns: np.ndarray) -> dict[str, np.ndarray]:
        scored = self.scorer.score(dict(zip(self.scorer.input_names, columns)))
        result = {name: _as_field(array, self.fields[name]) for name, array in scored.outputs.items()}
        result[ERROR_FIELD] = np.array(scored.errors, dtype=object)
        return result


def return_type(servable: str | os.PathLike, signature: str = DEFAULT_SIGNATURE):
    """The UDF's StructType: one field per output and the error field, from the manifest alone."""
    from pyspark.sql import types

    outputs = batched_signature(read_servable_manifest(servable), signature).outputs
    if any(spec.name == ERROR_FIELD for spec in outputs):
        raise ConfigError(f"an output is named {ERROR_FIELD!r}, the field Kiln reports bad rows in")
    fields = []
    for spec in outputs:
        if spec.shape is None:
            raise ConfigError(
                f"output {spec.name!r} has unknown rank: whether a row's value is one value or an array is "
                f"known only once it is scored, and predict_batch_udf needs its return type before"
            )
        element = getattr(types, _spark_type(spec))()
        fields.append(types.StructField(spec.name, element if len(spec.shape) == 1 else types.ArrayType(element)))
    return types.StructType([*fields, types.StructField(ERROR_FIELD, types.StringType())])


def predict_udf(
    servable: str | os.PathLike, signature: str = DEFAULT_SIGNATURE, *, batch_size: int = 32, threads: int | None = None
) -> Callable[..., Any]:
    """A function of the input columns (names or Columns, in the signature's input order) giving
    the struct column of outputs and error; bad rows, nulls included, are reported, not raised."""
    from pyspark.ml.functions import predict_batch_udf
    from pyspark.sql import functions

    inputs = batched_signature(read_servable_manifest(servable), signature).inputs
    udf = predict_batch_udf(
        make_predict_fn(servable, signature, threads=threads),
        return_type=return_type(servable, signature),
        batch_size=batch_size,
        input_tensor_shapes=[None] * (len(inputs) + 1),
    )

    def score(*columns: Any) -> Any:
        if len(columns) != len(inputs):
            raise ConfigError(
                f"signature {signature!r} takes {len(inputs)} column(s) "
                f"({', '.join(spec.name for spec in inputs)}), got {len(columns)}"
            )
        return udf(*columns, functions.lit(0))

    return score


def _spark_type(spec: TensorSpec) -> str:
    try:
        return SPARK_TYPES[spec.dtype]
    except KeyError:
        raise ConfigError(
            f"output {spec.name!r} has dtype {spec.dtype}, which predict_batch_udf cannot return"
        ) from None


def _as_field(array: np.ndarray, spark_type: str) -> np.ndarray:
    """An output as predict_batch_udf takes it: one value per row, or a flat array per row."""
    if spark_type == "StringType":
        array = np.vectorize(lambda b: b.decode("utf-8", "backslashreplace"), otypes=[object])(array)
    else:
        array = array.astype(NUMPY_TYPES[spark_type], copy=False)
    return array if array.ndim == 1 else array.reshape(len(array), -1)


def _task_cpus() -> int | None:
    """spark.task.cpus of the task calling (None outside a task: the engine's default)."""
    from pyspark import TaskContext

    context = TaskContext.get()
    return context.cpus() if context is not None else None
