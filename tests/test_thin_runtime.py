"""The serving path never imports TensorFlow, and the engine is safe from many threads at once."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from runtime.engines import open_servable
from tests.conftest import run_python

SERVE_AND_LIST_MODULES = """
import json, sys
import numpy as np
from runtime.engines import open_servable
engine = open_servable(sys.argv[1])
out = engine.run("serving_default", {"images": np.zeros((3, 28, 28, 1), np.float32)})
print(json.dumps({"shape": list(out["probabilities"].shape),
                  "heavy": sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "tf_keras", "jax", "torch"))}))
"""


def test_serving_path_never_imports_tensorflow(digits):
    done = run_python(SERVE_AND_LIST_MODULES, str(digits.servable))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"shape": [3, 10], "heavy": []}


def test_concurrent_calls_from_many_threads_match_serial(digits):
    engine = open_servable(digits.servable)
    rng = np.random.default_rng(1)
    batches = [rng.random((int(rows), 28, 28, 1), dtype=np.float32) for rows in rng.integers(1, 40, 64)]
    try:
        serial = [engine.run("serving_default", {"images": b})["probabilities"] for b in batches]
        with ThreadPoolExecutor(max_workers=8) as pool:
            parallel = list(pool.map(lambda b: engine.run("serving_default", {"images": b})["probabilities"],
                                     batches))
        for s, p in zip(serial, parallel):
            np.testing.assert_array_equal(s, p)
    finally:
        engine.close()


def test_serving_paths_leave_pydantic_out(digits):
    """pydantic's import and schemas were a third of a small servable's cold start: the manifest, the
    model and batching configuration, sessions and events are msgspec records (runtime/record.py)."""
    code = SERVE_AND_LIST_MODULES.replace(
        "import numpy as np", "import numpy as np, runtime.cli, runtime.app, handlers.local, handlers.gcp_events, "
        "handlers.aws_lambda, runtime.model_config, runtime.sessions.manifest")
    code = code.replace('("tensorflow", "keras", "tf_keras", "jax", "torch")', '("pydantic", "pydantic_core")')
    done = run_python(code, str(digits.servable))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"shape": [3, 10], "heavy": []}
