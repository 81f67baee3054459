"""Apache Beam: a ModelHandler for RunInference over a Kiln servable.

    main, dead = (rows | RunInference(KilnModelHandler("gs://models/digits/1")).with_exception_handling())
    dead.failed_preprocessing[0]   # (row, error) for each row that cannot be scored

load_model opens the servable once per worker process (runtime.integrations.core); batches are
sized by beam.BatchElements to the servable's largest bucket (batch_elements_kwargs), and
run_inference scores a batch in one call. An element is one row as TF Serving's row format has it
(the value for a one-input signature, else a mapping by input name; numpy arrays or lists); its
PredictionResult's inference is the row's output, or a dict by output name for several.

Each element is checked alone before batching, in the handler's preprocessing step, so that with
RunInference(...).with_exception_handling() a bad row goes to the dead-letter output
failed_preprocessing[0] as (element, exception) and its batch-mates are scored; without it, Beam
fails the bundle, as for any failing step. keyed=True takes (key, row) elements and gives (key,
PredictionResult), as Beam's KeyedModelHandler does (which refuses to wrap a handler that
preprocesses).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from runtime.codecs.tfserving import DEFAULT_SIGNATURE
from runtime.integrations.core import Scorer, batched_signature, read_servable_manifest


@dataclass(frozen=True)
class CheckedRow:
    """An element as it passed the check: the element itself and its inputs, one row each."""

    example: Any
    inputs: dict[str, np.ndarray]


class KilnModelHandler(ModelHandler[Any, Any, Scorer]):
    """RunInference's handler for one signature of a Kiln servable (local path, s3:// or gs://)."""

    def __init__(
        self,
        servable: str | os.PathLike,
        signature: str = DEFAULT_SIGNATURE,
        *,
        keyed: bool = False,
        threads: int | None = None,
        **batching: Any,
    ):
        super().__init__(**batching)
        self.servable = os.fspath(servable)
        self.signature = signature
        self.keyed = keyed
        self.threads = threads

    def load_model(self) -> Scorer:
        return Scorer.open(self.servable, self.signature, threads=self.threads)

    def get_preprocess_fns(self) -> list:
        return [self._check_keyed if self.keyed else self.check]

    def check(self, element: Any) -> CheckedRow:
        """The element with its inputs checked, or InvalidInput saying what is wrong with it."""
        return CheckedRow(element, self.load_model().check_row(element))  # the process's one engine

    def _check_keyed(self, element: tuple[Any, Any]) -> tuple[Any, CheckedRow]:
        key, row = element
        return key, self.check(row)

    def run_inference(
        self, batch: Sequence[Any], model: Scorer, inference_args: Mapping[str, Any] | None = None
    ) -> Iterable[Any]:
        keys, rows = zip(*batch) if self.keyed else ((), batch)
        checked = [row if isinstance(row, CheckedRow) else self.check(row) for row in rows]
        merged = {name: np.concatenate([row.inputs[name] for row in checked]) for name in model.input_names}
        outputs = model.engine.run(model.key, merged)
        single = next(iter(outputs.values())) if len(outputs) == 1 else None
        results = [
            PredictionResult(
                row.example, single[i] if single is not None else {name: array[i] for name, array in outputs.items()}
            )
            for i, row in enumerate(checked)
        ]
        return list(zip(keys, results)) if self.keyed else results

    def batch_elements_kwargs(self) -> Mapping[str, Any]:
        """beam.BatchElements' sizes, unless given: the servable's largest bucket, which its compiled
        code runs at the best rate per row (a bundle's last batch may be smaller)."""
        manifest = read_servable_manifest(self.servable)
        batched_signature(manifest, self.signature)
        given = dict(super().batch_elements_kwargs())
        size = given.setdefault("max_batch_size", manifest.batch_sizes[-1])
        given.setdefault("min_batch_size", size)
        return given

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        rows = [row[1] if self.keyed else row for row in batch]
        return sum(sum(a.nbytes for a in row.inputs.values()) if isinstance(row, CheckedRow) else 0 for row in rows)

    def get_metrics_namespace(self) -> str:
        return "RunInference_Kiln"
