"""Ray Data: a callable class for Dataset.map_batches, one servable per actor.

    ds.map_batches(KilnPredictor, fn_constructor_args=("s3://models/digits/1",),
                   batch_size=32, concurrency=2)

Each actor opens the servable once (runtime.integrations.core) with as many threads as Ray gave it
CPUs, and maps each batch (numpy, pandas or pyarrow) to the batch's columns plus one column per
output and an error column: None for a scored row, the reason for a bad one, whose outputs are a
fill (NaN for floats). A bad row never fails the job; filter on the error column.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from runtime.codecs.tfserving import DEFAULT_SIGNATURE
from runtime.errors import ConfigError
from runtime.integrations.core import Scorer


class KilnPredictor:
    """Scores Ray Data batches with a Kiln servable; `columns` maps input names to column names
    where they differ; keep_columns says which of the batch's columns to pass on (True: all, as
    Ray's examples do; a list of names: those, such as an id where the inputs are large or ragged)."""

    def __init__(
        self,
        servable: str | os.PathLike,
        signature: str = DEFAULT_SIGNATURE,
        *,
        threads: int | None = None,
        columns: Mapping[str, str] | None = None,
        error_column: str = "error",
        keep_columns: bool | Sequence[str] = True,
    ):
        self.scorer = Scorer.open(servable, signature, threads=threads or _actor_cpus())
        self.columns = {name: (columns or {}).get(name, name) for name in self.scorer.input_names}
        self.error_column = error_column
        self.keep_columns = keep_columns

    def __call__(self, batch: Any) -> dict[str, np.ndarray]:
        batch = _numpy_batch(batch)
        missing = [column for column in self.columns.values() if column not in batch]
        if missing:
            raise ConfigError(
                f"the batch has no column {', '.join(missing)} for the servable's inputs; "
                f"it has {', '.join(batch)} (map inputs to columns with columns=...)"
            )
        scored = self.scorer.score({name: batch[column] for name, column in self.columns.items()})
        keep = batch if self.keep_columns is True else (self.keep_columns or ())
        out = {column: batch[column] for column in keep}
        out.update(scored.outputs)
        out[self.error_column] = np.array(scored.errors, dtype=object)
        return out


def _numpy_batch(batch: Any) -> dict[str, np.ndarray]:
    """A batch in Ray's numpy format, whatever format map_batches was asked for."""
    if isinstance(batch, dict):
        return batch
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(batch).to_batch_format("numpy")


def _actor_cpus() -> int | None:
    """The CPUs Ray assigned to this actor or task (None outside Ray: the engine's default)."""
    import ray

    if not ray.is_initialized():
        return None
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    return max(1, round(cpus)) if cpus else None
