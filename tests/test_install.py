"""A pip install is a working install: the wheel built from a clean clone (committed sources only,
no generated modules) carries the protobuf modules its build step generated, and, installed into a
fresh virtual environment without the source tree, serves a models.config over REST and gRPC.

The environment (the wheel's dependencies from the package index, a minute or more) is cached under
the cache dir, keyed by pyproject.toml's dependencies; the wheel is reinstalled into it every run."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from runtime.cache import cache_root
from tests.conftest import ROOT, free_port, stop, wait_until_up

httpx = pytest.importorskip("httpx")
grpc = pytest.importorskip("grpc")
pytest.importorskip("tensorflow_serving")

pytestmark = pytest.mark.slow


def _venv_with_dependencies() -> Path:
    """A venv (no system site-packages) holding the project's dependencies, built once per set."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    key = hashlib.sha256("\n".join(sorted(dependencies) + [sys.version]).encode()).hexdigest()[:16]
    venv = cache_root() / "venvs" / f"install-{key}"
    if not (venv / "ready").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", *dependencies], check=True)
        (venv / "ready").touch()
    return venv


def _framework_library() -> str:
    """libtensorflow_framework.so.2 of this machine's tensorflow, without importing it (the one file
    of TensorFlow the thin runtime needs; README, 'Installing')."""
    spec = importlib.util.find_spec("tensorflow")
    path = Path(spec.submodule_search_locations[0]) / "libtensorflow_framework.so.2"
    assert path.is_file(), path
    return str(path)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The venv with this commit's wheel installed: built from a `git clone` of the repository."""
    work = tmp_path_factory.mktemp("install")
    clone = work / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    assert not (clone / "runtime" / "protos" / "generated").exists()  # a build output, never committed
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(work / "dist"),
                    str(clone)], check=True)
    (wheel,) = (work / "dist").glob("kiln-*.whl")
    venv = _venv_with_dependencies()
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--no-deps", "--force-reinstall", str(wheel)],
                   check=True)
    return venv


def test_the_wheel_carries_the_generated_modules(installed):
    found = subprocess.run([str(installed / "bin" / "python"), "-c",
                            "import runtime.protos.generated.tensorflow_serving.apis.prediction_service_pb2_grpc as m;"
                            "print(m.__file__)"], capture_output=True, text=True, cwd="/", check=True)
    assert Path(found.stdout.strip()).is_relative_to(installed)


def test_the_installed_kiln_serves_a_model_config(installed, examples, tmp_path):
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    config = tmp_path / "models.config"
    base = examples["digits"].servable.parent  # compiled ahead of time only: no TensorFlow in the venv
    config.write_text(f'model_config_list {{ config {{ name: "digits" base_path: "{base}" '
                      f'model_platform: "tensorflow" }} }}\n')
    rest, grpc_port = free_port(), free_port()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env["KILN_TF_FRAMEWORK_LIBRARY"] = _framework_library()
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen([str(installed / "bin" / "kiln"), "serve", "--model-config-file", str(config),
                                    "--rest-port", str(rest), "--grpc-port", str(grpc_port), "--host", "127.0.0.1"],
                                   cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{rest}/v1/models/digits"
    images = np.full((2, 28, 28, 1), 0.5, np.float32)
    try:
        wait_until_up(process, lambda: httpx.get(url, timeout=2).status_code == 200, log_path, "the installed kiln")
        answer = httpx.post(f"{url}:predict", json={"instances": images.tolist()}, timeout=10)
        assert answer.status_code == 200, answer.text
        by_rest = np.array(answer.json()["predictions"])  # one output: unnamed
        assert by_rest.shape == (2, 10)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "digits"
            tensor = request.inputs["images"]
            tensor.dtype = 1  # DT_FLOAT
            for size in images.shape:
                tensor.tensor_shape.dim.add().size = size
            tensor.tensor_content = images.tobytes()
            response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=10)
        probabilities = response.outputs["probabilities"]
        by_grpc = np.array(probabilities.float_val or np.frombuffer(probabilities.tensor_content, np.float32))
        np.testing.assert_allclose(by_grpc.reshape(2, 10), by_rest, rtol=1e-6)
    finally:
        stop(process)
