"""Ray Data's map_batches with KilnPredictor, on a local Ray instance of 2 CPUs (Ray's local_mode
is deprecated: this is a real cluster of one node, on loopback): every prediction as the engine
gives it, the bad rows in the error column, no TensorFlow in the actors."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tests.conftest import ROOT
from tests.scoring_rows import ROWS, check_scored, digit_rows, engine_module

ray = engine_module("ray")

from runtime.integrations.ray_data import KilnPredictor  # noqa: E402


class Probe(KilnPredictor):
    """KilnPredictor, and whether the actor running it has imported TensorFlow."""

    def __call__(self, batch):
        out = super().__call__(batch)
        out["tensorflow_loaded"] = np.full(len(out["error"]), "tensorflow" in sys.modules)
        return out


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return digit_rows(tmp_path_factory)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.mark.parametrize("batch_format", ["numpy", "pandas", "pyarrow"])
def test_map_batches_scores_every_row_and_reports_bad_ones(rows, cluster, batch_format):
    """Rows as a table read from Parquet has them: a list column, 784 values a row, one row short
    and one null (Ray cannot put those in one batch with tensors made of rows of one shape)."""
    import pyarrow as pa

    table = pa.table({"id": np.arange(ROWS), "images": pa.array(rows.flat_values(), type=pa.list_(pa.float32()))})
    ds = ray.data.from_arrow(table).map_batches(
        Probe, fn_constructor_args=(str(rows.servable),), fn_constructor_kwargs={"keep_columns": ["id"]},
        batch_size=32, batch_format=batch_format, compute=ray.data.ActorPoolStrategy(size=2))
    out = sorted(ds.take_all(), key=lambda row: row["id"])
    assert len(out) == ROWS and not any(row["tensorflow_loaded"] for row in out)
    check_scored(rows, np.stack([row["probabilities"] for row in out]), [row["error"] for row in out])


def test_columns_map_inputs_and_outputs_may_stand_alone(rows, cluster):
    ds = ray.data.from_numpy(rows.images[:64]).map_batches(  # from_numpy names its column "data"
        KilnPredictor, fn_constructor_args=(str(rows.servable),),
        fn_constructor_kwargs={"columns": {"images": "data"}, "keep_columns": False},
        batch_size=32, compute=ray.data.ActorPoolStrategy(size=1))
    out = ds.take_all()
    assert set(out[0]) == {"probabilities", "error"}
    np.testing.assert_allclose(np.stack([row["probabilities"] for row in out]), rows.expected[:64],
                               rtol=1e-5, atol=1e-6)
