"""Beam's RunInference with KilnModelHandler on the DirectRunner, keyed and unkeyed: every
prediction as the engine gives it, the bad rows (one misshapen, one null) in the dead-letter
output, their batch-mates scored.

apache-beam pins pillow<13 and pyarrow<26, below what this environment has, so where it is not
installed these tests run again in a venv of their own (tests/engine_venv.py: made once, about
20 s, then cached), as one test here.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT
from tests.scoring_rows import NULL, ROWS, WRONG_SHAPE, check_scored, digit_rows

if importlib.util.find_spec("apache_beam") is None:
    def test_beam_in_its_own_venv():
        from tests.engine_venv import engine_python

        python = engine_python("beam")
        run = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                             cwd=ROOT, capture_output=True, text=True, env={**os.environ, "KILN_BEAM_VENV": "1"})
        assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-6000:] + run.stderr[-3000:]
else:
    import apache_beam as beam
    from apache_beam.ml.inference.base import PredictionResult, RunInference
    from apache_beam.testing.util import assert_that

    from runtime.integrations.beam import KilnModelHandler

    @pytest.fixture(scope="module")
    def rows(tmp_path_factory):
        return digit_rows(tmp_path_factory)

    def saved_to(path: Path):
        """A matcher for assert_that that keeps what it is given (the runner's workers hold copies
        of anything a test would collect into)."""
        def keep(items):
            path.write_bytes(pickle.dumps(list(items)))
        return keep

    def test_run_inference_scores_every_row_and_dead_letters_bad_ones(rows, tmp_path):
        handler = KilnModelHandler(rows.servable)
        assert handler.batch_elements_kwargs() == {"min_batch_size": 32, "max_batch_size": 32}
        with beam.Pipeline() as pipeline:
            main, dead = (pipeline | beam.Create(list(enumerate(rows.values())))
                          | beam.Map(lambda item: {"images": item[1], "id": item[0]} if item[1] is not None else None)
                          | RunInference(handler).with_exception_handling())
            assert_that(main | beam.Map(lambda r: (r.example["id"], r.inference)), saved_to(tmp_path / "main"),
                        label="main")
            assert_that(dead.failed_preprocessing[0] | beam.Map(lambda bad: (bad[0], str(bad[1]))),
                        saved_to(tmp_path / "dead"), label="dead")
        scored = dict(pickle.loads((tmp_path / "main").read_bytes()))
        dead = pickle.loads((tmp_path / "dead").read_bytes())
        probabilities = np.full((ROWS, 10), np.nan, np.float32)
        errors = [None] * ROWS
        for row, inference in scored.items():
            probabilities[row] = inference
        for element, error in dead:
            errors[WRONG_SHAPE if element is not None else NULL] = error
        assert len(scored) == ROWS - 2 and len(dead) == 2
        check_scored(rows, probabilities, errors)

    def test_keyed(rows, tmp_path):
        handler = KilnModelHandler(str(rows.servable), keyed=True, max_batch_size=8)
        assert handler.batch_elements_kwargs()["max_batch_size"] == 8
        with beam.Pipeline() as pipeline:
            out = (pipeline | beam.Create([(f"row-{i}", rows.images[i]) for i in range(100)])
                   | RunInference(handler))
            assert_that(out, saved_to(tmp_path / "keyed"))
        keyed = dict(pickle.loads((tmp_path / "keyed").read_bytes()))
        assert all(isinstance(result, PredictionResult) for result in keyed.values())
        np.testing.assert_allclose(np.stack([keyed[f"row-{i}"].inference for i in range(100)]), rows.expected[:100],
                                   rtol=1e-5, atol=1e-6)
