"""The xla-aot runner passes a large, aligned, exact-bucket input to the compiled code by pointer
instead of copying it, and every other input by copy, with the same outputs either way."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from runtime.aligned import ALIGNMENT, aligned_zeros
from runtime.engines import open_servable, xla_aot
from runtime.engines.xla_aot import AotRunner
from runtime.manifest import read_manifest

SHAPE = (28, 28, 1)  # one row of digits' "images"
BUCKET = 32


@pytest.fixture(scope="module")
def servable(tmp_path_factory):
    """digits alone: the shared fixture builds every example, and this needs only one."""
    from examples.build import build_examples

    return build_examples(tmp_path_factory.mktemp("zero-copy"), models=["digits"])["digits"].servable


@pytest.fixture(scope="module")
def runner(servable):
    runner = AotRunner(servable, read_manifest(servable).signatures["serving_default"])
    yield runner
    runner.close()


@pytest.fixture(autouse=True)
def small_threshold(monkeypatch):
    """Lend anything over 1 KiB, whatever the production threshold: digits' inputs are small."""
    monkeypatch.setattr(xla_aot, "BY_POINTER_MIN_BYTES", 1024)


def images(seed: int, rows: int = BUCKET) -> np.ndarray:
    """Random images in a 64-byte-aligned array, as a decode loop's pool would hold them."""
    array = aligned_zeros((rows, *SHAPE), np.float32)
    array[...] = np.random.default_rng(seed).random(array.shape, dtype=np.float32)
    return array


def misaligned(array: np.ndarray) -> np.ndarray:
    """A C-contiguous copy whose data starts 4 bytes past an alignment boundary."""
    raw = aligned_zeros(array.nbytes + 4, np.uint8)
    copy = raw[4:].view(array.dtype).reshape(array.shape)
    copy[...] = array
    assert copy.flags.c_contiguous and copy.ctypes.data % ALIGNMENT == 4
    return copy


def instance_of(runner: AotRunner, bucket: int = BUCKET):
    """The bucket's one pooled instance (calls from one thread always get it)."""
    library = runner.libraries[bucket]
    instance = library.acquire()
    library.release(instance)
    return instance


def own_buffer(runner: AotRunner, bucket: int = BUCKET) -> np.ndarray:
    """What the instance's own "images" buffer holds now."""
    return instance_of(runner, bucket).args["images"].copy()


def probabilities(runner: AotRunner, array: np.ndarray, bucket: int = BUCKET) -> np.ndarray:
    return runner.run({"images": array}, bucket)["probabilities"]


@pytest.mark.parametrize("shape, dtype, alignment", [
    ((32, 2, 2, 4, 16, 16), np.float32, 64), (3, np.int8, 64), ((5, 7), np.float64, 4096), ((2, 3), np.int16, 128),
])
def test_aligned_zeros(shape, dtype, alignment):
    array = aligned_zeros(shape, dtype, alignment)
    assert array.ctypes.data % alignment == 0
    assert array.shape == ((shape,) if isinstance(shape, int) else shape) and array.dtype == dtype
    assert array.flags.c_contiguous and array.flags.writeable and not array.any()


def test_exact_aligned_input_goes_by_pointer_with_the_copied_outputs(runner):
    lent, other = images(1), images(2)
    expected = probabilities(runner, misaligned(lent))
    probabilities(runner, misaligned(other))  # the instance's own buffer now holds `other`
    got = probabilities(runner, lent)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(own_buffer(runner), other)  # the input never went through it
    for copied in (misaligned(lent), np.asfortranarray(lent)):
        np.testing.assert_array_equal(probabilities(runner, copied), expected)
        np.testing.assert_array_equal(own_buffer(runner), lent)  # these went through it


def test_a_copied_input_after_a_lent_one_is_used(runner):
    lent, copied = images(3), images(4)
    expected = probabilities(runner, misaligned(copied))
    probabilities(runner, lent)
    instance = instance_of(runner)
    index = instance.lib.kiln_arg_index(instance.handle, b"images")
    assert instance.lib.kiln_arg_data(instance.handle, index) == instance.args["images"].ctypes.data
    np.testing.assert_array_equal(probabilities(runner, misaligned(copied)), expected)
    assert not np.array_equal(expected, probabilities(runner, lent))


def test_fewer_rows_than_the_bucket_are_copied_and_padded(runner):
    short = images(5, rows=20)
    probabilities(runner, images(6))  # something non-zero in the padding rows' place, were it lent
    got = probabilities(runner, short)
    assert got.shape == (20, 10)
    own = own_buffer(runner)
    np.testing.assert_array_equal(own[:20], short)
    assert not own[20:].any()
    np.testing.assert_array_equal(got, probabilities(runner, misaligned(short)))


def test_outputs_do_not_change_with_the_lent_array(runner):
    lent = images(7)
    got = probabilities(runner, lent)
    kept = got.copy()
    lent[...] = np.random.default_rng(8).random(lent.shape, dtype=np.float32)
    assert not np.array_equal(probabilities(runner, lent), kept)
    np.testing.assert_array_equal(got, kept)


def test_inputs_under_the_threshold_are_copied(runner, monkeypatch):
    small = images(9)
    monkeypatch.setattr(xla_aot, "BY_POINTER_MIN_BYTES", small.nbytes + 1)
    probabilities(runner, small)
    np.testing.assert_array_equal(own_buffer(runner), small)


def test_lending_from_many_threads_matches_copying(runner):
    arrays = [images(seed) for seed in range(10, 26)]
    expected = [probabilities(runner, misaligned(a)) for a in arrays]
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda a: probabilities(runner, a), arrays))
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(e, g)


def test_the_engine_lends_a_batch_that_fills_a_bucket(servable):
    """Engine.run hands a contiguous batch through unchanged, so a decode loop's pool slice is lent."""
    engine = open_servable(servable)
    try:
        runner = engine._runners["serving_default"]
        batch, before = images(27), images(28)
        expected = engine.run("serving_default", {"images": misaligned(batch)})["probabilities"]
        engine.run("serving_default", {"images": misaligned(before)})
        np.testing.assert_array_equal(engine.run("serving_default", {"images": batch})["probabilities"], expected)
        np.testing.assert_array_equal(own_buffer(runner), before)
    finally:
        engine.close()


def test_a_library_from_before_lending_still_loads_and_copies(servable, monkeypatch):
    """A library an older Kiln compiled has no kiln_set_arg_data: it loads, and its inputs are copied."""
    real = xla_aot.ctypes.CDLL

    class Older:
        def __init__(self, path, *args, **kwargs):
            self._library = real(path, *args, **kwargs)

        def __getattr__(self, name):
            if name == "kiln_set_arg_data":
                raise AttributeError(name)
            return getattr(self._library, name)

    lent = images(3)
    with monkeypatch.context() as patched:
        patched.setattr(xla_aot.ctypes, "CDLL", Older)
        older = AotRunner(servable, read_manifest(servable).signatures["serving_default"])
    try:
        assert not older.libraries[BUCKET].lends
        got = probabilities(older, lent)
        np.testing.assert_array_equal(own_buffer(older), lent)  # copied into the instance's own buffer
    finally:
        older.close()
    with_lending = AotRunner(servable, read_manifest(servable).signatures["serving_default"])
    try:
        np.testing.assert_array_equal(got, probabilities(with_lending, lent))
    finally:
        with_lending.close()
