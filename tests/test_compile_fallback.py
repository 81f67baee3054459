"""Signatures XLA AOT cannot take are never dropped: --engine xla-aot names the signature and the
reason; --engine auto packages them for the saved-model engine, which answers like TensorFlow."""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtime.compiler.compile import compile_servable
from runtime.engines import open_servable
from runtime.errors import CompileError
from tests.conftest import run_python

BUCKETS = (1, 4)


def save(module, path, signatures):
    import tensorflow as tf

    tf.saved_model.save(module, str(path), signatures=signatures)
    return path


@pytest.fixture(scope="module")
def awkward_models(tmp_path_factory):
    """One SavedModel per obstacle: string input, dynamic inner dimension, lookup table."""
    import tensorflow as tf

    root = tmp_path_factory.mktemp("awkward")
    module = tf.Module()

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def lengths(text):
        return {"length": tf.strings.length(text)}

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.float32, name="values")])
    def row_sums(values):
        return {"total": tf.reduce_sum(values, axis=1)}

    module.table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant([1, 2, 3], tf.int64), tf.constant([10.0, 20.0, 30.0])),
        default_value=-1.0)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name="ids")])
    def lookup(ids):
        return {"value": module.table.lookup(ids)}

    return {
        "string": (save(module, root / "string", {"serving_default": lengths}),
                   "input 'text' has dtype string, which XLA AOT cannot take, and its string front cannot run on "
                   "the host: op StringLength", {"text": np.array([b"a", b"kiln", b""], dtype=object)},
                   {"length": [1, 4, 0]}),
        "dynamic": (save(module, root / "dynamic", {"serving_default": row_sums}),
                    "input 'values' has shape [-1, -1] with a dynamic inner dimension",
                    {"values": np.ones((2, 5), np.float32)}, {"total": [5.0, 5.0]}),
        "table": (save(module, root / "table", {"serving_default": lookup}), "XLA could not compile it",
                  {"ids": np.array([3, 1, 7], np.int64)}, {"value": [30.0, 10.0, -1.0]}),
    }


@pytest.mark.parametrize("kind", ["string", "dynamic", "table"])
def test_forced_aot_names_signature_and_reason(awkward_models, tmp_path, kind):
    saved_model, reason, _, _ = awkward_models[kind]
    with pytest.raises(CompileError) as error:
        compile_servable(saved_model, tmp_path / kind / "1", engine="xla-aot", batch_sizes=BUCKETS)
    assert "signature 'serving_default' cannot be compiled ahead of time" in str(error.value)
    assert reason in str(error.value)
    assert not (tmp_path / kind / "1").exists(), "a failed compile must leave no servable behind"


@pytest.mark.parametrize("kind", ["string", "dynamic", "table"])
def test_auto_packages_for_saved_model_engine(awkward_models, tmp_path, kind):
    saved_model, reason, inputs, expected = awkward_models[kind]
    manifest = compile_servable(saved_model, tmp_path / kind / "1", batch_sizes=BUCKETS)
    signature = manifest.signatures["serving_default"]
    assert manifest.engine == "saved-model" and signature.engine == "saved-model"
    assert reason in signature.reason
    assert not signature.jit, "XLA cannot compile these, so they run as TensorFlow graphs"
    engine = open_servable(tmp_path / kind / "1")
    try:
        outputs = engine.run("serving_default", inputs)
    finally:
        engine.close()
    for name, want in expected.items():
        np.testing.assert_allclose(outputs[name], want)
    inspected = run_python("from runtime.cli import main; main()", "inspect", str(tmp_path / kind / "1"))
    assert inspected.returncode == 0 and f"serving_default: not ahead-of-time compiled: {reason}" in inspected.stdout


PREDICT_EVERY_BUCKET = """
import json, sys
import numpy as np
from runtime.engines import open_servable
engine = open_servable(sys.argv[1])
rows = [int(b) for b in engine.manifest.batch_sizes]
out = {str(r): engine.run("serving_default", {"images": np.full((r, 28, 28, 1), 0.5, np.float32)})["probabilities"][0].tolist() for r in rows}
print(json.dumps(out))
"""


def test_saved_model_engine_serves_every_bucket_from_the_prebuilt_xla_cache(digits, tmp_path):
    servable = tmp_path / "digits" / "1"
    manifest = compile_servable(digits.saved_model, servable, engine="saved-model", batch_sizes=BUCKETS)
    signature = manifest.signatures["serving_default"]
    assert signature.engine == "saved-model" and signature.jit
    cache = servable / "xla_cache"
    before = sorted(p.name for p in cache.rglob("*") if p.is_file())
    assert len(before) >= len(BUCKETS), "one compiled executable per bucket is prebuilt"

    # A writable cache would record any compilation a request paid for.
    done = run_python(PREDICT_EVERY_BUCKET, str(servable), env={"KILN_XLA_CACHE_WRITABLE": "1"})
    assert done.returncode == 0, done.stderr
    after = sorted(p.name for p in cache.rglob("*") if p.is_file())
    assert after == before, "serving compiled nothing new: every bucket came from the cache"
    served = json.loads(done.stdout.strip().splitlines()[-1])

    aot = open_servable(digits.servable)
    try:
        for rows, first in served.items():
            want = aot.run("serving_default", {"images": np.full((int(rows), 28, 28, 1), 0.5, np.float32)})
            np.testing.assert_allclose(first, want["probabilities"][0], atol=1e-5)
    finally:
        aot.close()
