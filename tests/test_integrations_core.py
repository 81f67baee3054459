"""The shared core of the batch engine integrations: opening a servable by path or URL once per
process, rows to inputs, and bad rows isolated (runtime/integrations/core.py). No engine needed."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from runtime.errors import ConfigError, InvalidInput
from runtime.integrations import core
from runtime.integrations.core import Scorer, open_engine, read_servable_manifest
from runtime.servable_cache import ServableCache
from tests.conftest import ROOT
from tests.scoring_rows import NULL, WRONG_SHAPE, check_scored, digit_rows
from tests.test_storage import upload


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return digit_rows(tmp_path_factory)


@pytest.fixture(scope="module")
def scorer(rows):
    return Scorer.open(rows.servable)


def test_a_batch_of_good_rows_scores_as_the_engine_does(rows, scorer):
    scored = scorer.score({"images": rows.images[:100]})
    assert scored.errors == [None] * 100
    np.testing.assert_allclose(scored.outputs["probabilities"], rows.expected[:100], rtol=1e-5, atol=1e-6)


def test_bad_rows_get_their_error_and_the_rest_are_scored(rows, scorer):
    scored = scorer.score({"images": rows.values()})
    check_scored(rows, scored.outputs["probabilities"], scored.errors)


def test_rows_of_other_kinds(rows, scorer):
    flat = rows.images[:3].reshape(3, -1)  # Spark's tensor columns: 784 values a row
    as_lists = [image.tolist() for image in rows.images[:2]]  # JSON-ish
    assert scorer.score({"images": flat}).errors == [None] * 3
    scored = scorer.score({"images": [*as_lists, "text", [[1.0]]]})
    assert scored.errors[:2] == [None, None]
    np.testing.assert_allclose(scored.outputs["probabilities"][:2], rows.expected[:2], rtol=1e-5, atol=1e-6)
    assert "dtype float32, got string" in scored.errors[2] and "shape" in scored.errors[3]


def test_rows_as_instances(rows, scorer):
    """TF Serving's row format: a value for a one-input signature, or an object by input name."""
    columns = scorer.columns_of([rows.images[0], {"images": rows.images[1]}, {"other": 1.0}])
    scored = scorer.score(columns)
    assert scored.errors[:2] == [None, None] and "no value" in scored.errors[2]
    assert scorer.check_row(rows.images[0])["images"].shape == (1, 28, 28, 1)
    with pytest.raises(InvalidInput, match="must have shape"):
        scorer.check_row(np.zeros(3, np.float32))


def test_a_batch_failing_as_a_whole_is_rerun_row_by_row(rows, scorer, monkeypatch):
    real = scorer.engine.run

    def fails_merged(key, inputs):
        if len(inputs["images"]) > 1:
            raise InvalidInput("only this batch")
        return real(key, inputs)

    monkeypatch.setattr(scorer.engine, "run", fails_merged)
    scored = scorer.score({"images": rows.values()[:10]})
    assert [e is None for e in scored.errors] == [row not in (WRONG_SHAPE, NULL) for row in range(10)]
    np.testing.assert_allclose(scored.outputs["probabilities"][:5], rows.expected[:5], rtol=1e-5, atol=1e-6)


def test_what_is_no_rows_fault_is_raised(scorer, monkeypatch):
    with pytest.raises(ConfigError, match="no column for input"):
        scorer.score({"pixels": np.zeros((1, 28, 28, 1), np.float32)})

    def broken(key, inputs):
        raise RuntimeError("the engine broke")

    monkeypatch.setattr(scorer.engine, "run", broken)
    with pytest.raises(RuntimeError, match="the engine broke"):
        scorer.score({"images": [np.zeros((28, 28, 1), np.float32), None]})


def test_a_servable_opens_once_per_process_by_path_or_model_directory(rows):
    assert open_engine(rows.servable) is open_engine(str(rows.servable) + "/")
    assert Scorer.open(rows.servable.parent).engine.manifest.version == 1  # BASE/NAME: the newest version
    assert read_servable_manifest(rows.servable).batch_sizes == (1, 2, 4, 8, 16, 32)
    with pytest.raises(ConfigError, match="has no signature 'nope'"):
        Scorer.open(rows.servable, "nope")


def test_s3_servables_come_through_the_verified_cache(rows, bucket, tmp_path, monkeypatch):
    client, name = bucket
    upload(client, name, rows.servable, "models/digits/3")
    monkeypatch.setattr(core, "_cache", ServableCache(tmp_path / "cache"))
    url = f"s3://{name}/models/digits"
    assert read_servable_manifest(url).version == 1  # the manifest alone: nothing downloaded
    assert not (tmp_path / "cache").exists()
    scorer = Scorer.open(url)  # the newest version, 3
    assert scorer.engine.directory.is_relative_to(tmp_path / "cache")
    assert scorer.score({"images": rows.images[:4]}).errors == [None] * 4


def test_the_core_imports_no_batch_engine_and_no_tensorflow(rows):
    code = ("import sys; from runtime.integrations.core import Scorer; "
            f"s = Scorer.open({str(rows.servable)!r}); "
            "import numpy as np; s.score({'images': np.zeros((3, 28, 28, 1), np.float32)}); "
            "print(sorted(m for m in ('tensorflow', 'ray', 'pyspark', 'apache_beam') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
