"""Wrong input names, dtypes and shapes get one clear error naming the input, what was expected and
what was received; batches of any size are split into and padded to the buckets."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.buckets import plan_chunks
from runtime.engines import open_servable
from runtime.errors import InvalidInput


@pytest.fixture(scope="module")
def engine(digits):
    engine = open_servable(digits.servable)
    yield engine
    engine.close()


def images(rows, dtype=np.float32):
    return np.zeros((rows, 28, 28, 1), dtype)


@pytest.mark.parametrize("inputs, message", [
    ({"image": images(1)}, "missing input(s) images; unknown input(s) image; the signature takes images"),
    ({}, "missing input(s) images"),
    ({"images": images(1), "extra": images(1)}, "unknown input(s) extra"),
    ({"images": np.zeros((1, 28, 28), np.float32)}, "input 'images' must have shape [-1, 28, 28, 1], got [1, 28, 28]"),
    ({"images": np.zeros((2, 27, 28, 1), np.float32)}, "input 'images' must have shape [-1, 28, 28, 1], got [2, 27, 28, 1]"),
    ({"images": np.array([["a"]])}, "input 'images' must have dtype float32, got string"),
    ({"images": images(1, np.complex64)}, "input 'images' must have dtype float32, got complex64"),
    ({"images": images(0)}, "the batch is empty"),
])
def test_bad_inputs_are_named(engine, inputs, message):
    with pytest.raises(InvalidInput) as error:
        engine.run("serving_default", inputs)
    assert message in str(error.value)


def test_unknown_signature_lists_the_known_ones(engine):
    with pytest.raises(InvalidInput, match="signature 'nope' not found in model digits; it has: serving_default"):
        engine.run("nope", {"images": images(1)})


def test_numeric_inputs_convert_within_their_kind(engine):
    as_float64 = engine.run("serving_default", {"images": images(2, np.float64)})
    as_float32 = engine.run("serving_default", {"images": images(2)})
    np.testing.assert_array_equal(as_float64["probabilities"], as_float32["probabilities"])


def test_padding_is_removed_and_rows_stay_in_order(engine):
    rng = np.random.default_rng(2)
    batch = rng.random((45, 28, 28, 1), dtype=np.float32)
    together = engine.run("serving_default", {"images": batch})["probabilities"]
    assert together.shape == (45, 10)
    one_by_one = np.concatenate([engine.run("serving_default", {"images": batch[i:i + 1]})["probabilities"]
                                 for i in range(45)])
    # Buckets are separately compiled programs (batch 1 runs XLA's own dot, larger ones Eigen's
    # GEMM), so sums are ordered differently: the same 1e-5 that bounds Kiln against TensorFlow.
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


@pytest.mark.parametrize("rows, chunks", [
    (1, [(0, 1, 1)]), (3, [(0, 3, 4)]), (8, [(0, 8, 8)]), (32, [(0, 32, 32)]),
    (33, [(0, 32, 32), (32, 33, 1)]), (70, [(0, 32, 32), (32, 64, 32), (64, 70, 8)]),
])
def test_plan_chunks(rows, chunks):
    assert plan_chunks(rows, (1, 2, 4, 8, 16, 32)) == chunks


def test_every_bucket_is_used_exactly_at_its_size():
    buckets = (1, 2, 4, 8, 16, 32)
    for bucket in buckets:
        assert plan_chunks(bucket, buckets) == [(0, bucket, bucket)]
