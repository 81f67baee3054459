"""The runtime library found by its key (format 3, `kiln compile`'s default): not in the servable, but
installed where it was compiled and written once per store in BASE/.kiln/runtime/KEY/, checked by its
sha256 wherever it is found, and fetched once per store by the servable cache (over moto's S3 server)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime import runtime_library
from runtime.compiler.compile import compile_servable
from runtime.engines import open_servable
from runtime.errors import ServableError
from runtime.manifest import SHARED_RUNTIME_FORMAT, read_manifest
from runtime.servable_cache import ServableCache
from runtime.storage import open_storage
from tests.test_shared_runtime import BUCKETS, WEIGHTS, flip_byte, save_model

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"a": WEIGHTS, "b": -WEIGHTS}  # one matmul each: the same kernels, so the same runtime key


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A store BASE with the servables a/1 and b/1, compiled with the defaults."""
    work = tmp_path_factory.mktemp("by-key")
    for name, weights in MODELS.items():
        compile_servable(save_model(work / f"{name}-saved", weights), work / "base" / name / "1", batch_sizes=BUCKETS)
    return work / "base"


@pytest.fixture
def nothing_installed(monkeypatch, tmp_path):
    """A machine where no runtime is installed: an empty cache directory and no KILN_RUNTIME_PATH."""
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "empty-cache"))
    monkeypatch.delenv(runtime_library.PATH_ENV, raising=False)


def check_runs(servable: Path, weights: np.ndarray, **options) -> None:
    engine = open_servable(servable, **options)
    try:
        for rows in (1, 3, 4):
            x = np.random.default_rng(rows).random((rows, 16), np.float32)
            np.testing.assert_allclose(engine.run("serving_default", {"x": x})["y"], x @ weights + 1.0, atol=1e-5)
    finally:
        engine.close()


def test_two_servables_share_one_runtime_copy(base, nothing_installed):
    manifests = {name: read_manifest(base / name / "1") for name in MODELS}
    runtime = manifests["a"].runtime
    assert runtime == manifests["b"].runtime.replace(bytes_saved=runtime.bytes_saved)
    assert manifests["a"].format_version == SHARED_RUNTIME_FORMAT and not runtime.embedded
    for name, manifest in manifests.items():
        assert not any("libkiln_runtime" in path for path in manifest.files)
        assert not list((base / name).rglob("libkiln_runtime*"))
        assert sum(entry.size for entry in manifest.files.values()) < runtime.size  # the runtime was most of it
    copies = list(base.rglob("libkiln_runtime*"))
    assert copies == [runtime_library.store_copy(base, runtime)] and copies[0].stat().st_size == runtime.size
    found = {name: runtime_library.locate(base / name / "1", runtime) for name in MODELS}
    assert found["a"] == found["b"] == copies[0]
    for name, weights in MODELS.items():
        check_runs(base / name / "1", weights)


def test_the_machine_that_compiled_them_has_the_runtime_installed(base):
    runtime = read_manifest(base / "a" / "1").runtime
    found = {name: runtime_library.locate(base / name / "1", runtime) for name in MODELS}
    assert found["a"] == found["b"] == runtime_library.install_copy(runtime)
    assert found["a"].stat().st_ino != runtime_library.store_copy(base, runtime).stat().st_ino


def test_kiln_runtime_path_comes_first_and_is_checked_too(base, nothing_installed, tmp_path, monkeypatch):
    runtime = read_manifest(base / "a" / "1").runtime
    image = tmp_path / "opt-kiln-runtime"
    shutil.copytree(runtime_library.store_copy(base, runtime).parent, image / runtime.key)
    monkeypatch.setenv(runtime_library.PATH_ENV, f"{tmp_path / 'nowhere'}:{image}")
    assert runtime_library.locate(base / "a" / "1", runtime) == image / runtime.key / runtime_library.file_name(runtime)
    flip_byte(image / runtime.key / runtime_library.file_name(runtime), runtime.size // 2)
    with pytest.raises(ServableError, match=f"has sha256 .* expects {runtime.sha256} \\(runtime {runtime.key}\\)"):
        open_servable(base / "a" / "1")


def test_a_missing_runtime_is_refused_naming_its_key_and_where_it_looked(base, nothing_installed, tmp_path):
    alone = tmp_path / "elsewhere" / "a" / "1"
    shutil.copytree(base / "a" / "1", alone)
    runtime = read_manifest(alone).runtime
    with pytest.raises(ServableError) as refused:
        open_servable(alone)
    message = str(refused.value)
    assert runtime.key in message and "--embed-runtime" in message
    assert str(runtime_library.store_copy(tmp_path / "elsewhere", runtime)) in message
    assert str(runtime_library.install_copy(runtime)) in message


def test_a_corrupted_runtime_is_refused_by_checksum(base, nothing_installed, tmp_path):
    copy = tmp_path / "base"
    shutil.copytree(base, copy)
    runtime = read_manifest(copy / "a" / "1").runtime
    flip_byte(runtime_library.store_copy(copy, runtime), runtime.size // 2)
    with pytest.raises(ServableError, match=f"has sha256 .* expects {runtime.sha256}"):
        open_servable(copy / "a" / "1")
    runtime_library.store_copy(copy, runtime).write_bytes(b"\x7fELF")  # another size: refused before hashing
    with pytest.raises(ServableError, match=f"has 4 bytes, servable .* expects {runtime.size}"):
        open_servable(copy / "a" / "1", verify=False)


def upload(client, bucket: str, base: Path) -> None:
    for path in sorted(base.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, str(path.relative_to(base)))


def test_the_store_runtime_is_fetched_once_for_two_models(base, nothing_installed, bucket, tmp_path):
    client, name = bucket
    upload(client, name, base)
    storage = open_storage(f"s3://{name}")
    runtime = read_manifest(base / "a" / "1").runtime
    downloads = []
    fetch = storage.download
    storage.download = lambda key, dest, size=None: downloads.append(key) or fetch(key, dest, size)
    cache = ServableCache(tmp_path / "servables")
    fetched = {model: cache.fetch(storage, model, 1) for model in MODELS}
    assert downloads.count(runtime_library.store_key(runtime)) == 1, downloads
    shared = runtime_library.store_copy(fetched["a"].directory.parent.parent, runtime)
    assert shared.stat().st_size == runtime.size and list((tmp_path / "servables").rglob("libkiln_runtime*")) == [shared]
    for model, weights in MODELS.items():
        assert fetched[model].verified
        assert runtime_library.locate(fetched[model].directory, runtime) == shared
        check_runs(fetched[model].directory, weights, verify=False)
    cache._make_room(1 << 40)  # evicts every unpinned version, never the store's runtime
    assert shared.is_file()


def test_a_store_without_the_runtime_is_refused_at_fetch(base, nothing_installed, bucket, tmp_path):
    client, name = bucket
    for path in sorted((base / "a").rglob("*")):
        if path.is_file():
            client.upload_file(str(path), name, f"a/{path.relative_to(base / 'a')}")
    runtime = read_manifest(base / "a" / "1").runtime
    cache = ServableCache(tmp_path / "servables")
    with pytest.raises(ServableError, match=f"runtime library {runtime.key}.* nor in its store"):
        cache.fetch(open_storage(f"s3://{name}"), "a", 1)
    assert not list((tmp_path / "servables").rglob("manifest.json"))


def test_a_store_runtime_of_another_build_is_refused_at_fetch(base, nothing_installed, bucket, tmp_path):
    client, name = bucket
    upload(client, name, base)
    runtime = read_manifest(base / "a" / "1").runtime
    client.put_object(Bucket=name, Key=runtime_library.store_key(runtime), Body=b"\x7fELF not this one")
    cache = ServableCache(tmp_path / "servables")
    with pytest.raises(ServableError, match=f"expects {runtime.size} bytes and sha256 {runtime.sha256}"):
        cache.fetch(open_storage(f"s3://{name}"), "a", 1)
    assert not list((tmp_path / "servables").rglob("libkiln_runtime*"))


def test_the_models_of_a_repository_leave_out_its_runtimes(base):
    from runtime.settings import Settings

    names = [model.name for model in Settings(model_repository=str(base)).model_config().models]
    assert names == ["a", "b"]


def test_inspect_shows_the_key_and_that_the_runtime_is_not_in_the_servable(base):
    manifest = read_manifest(base / "a" / "1")
    shown = subprocess.run([sys.executable, "-m", "runtime.cli", "inspect", str(base / "a" / "1")], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    assert manifest.runtime.key in shown and "not in the servable" in shown
    # Format 1 put the runtime and the constants in both bucket libraries: about two runtimes more.
    assert manifest.runtime.bytes_saved > manifest.runtime.size * 3 // 2
    assert re.search(rf"^bytes saved +{manifest.runtime.bytes_saved / 1e6:.1f} MB", shown, re.M)


def test_kiln_serve_finds_the_runtime_in_its_repository(base, tmp_path):
    """`kiln serve` over the repository on a machine with nothing installed: the models are a and b
    (not .kiln), and both load the runtime from the repository's .kiln/runtime/."""
    import os

    import httpx

    from tests.conftest import free_port, stop, wait_until_up

    port, log_path = free_port(), tmp_path / "serve.log"
    env = {**os.environ, "KILN_CACHE_DIR": str(tmp_path / "empty-cache"), "KILN_WORKERS": "1"}
    env.pop(runtime_library.PATH_ENV, None)
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve", "--model-repository", str(base),
                                    "--rest-port", str(port), "--grpc-port", "0", "--host", "127.0.0.1"],
                                   cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(process, lambda: all(httpx.get(f"{url}/v1/models/{name}", timeout=2).status_code == 200
                                           for name in MODELS), log_path, "kiln serve")
        listed = httpx.get(f"{url}/v1/models", timeout=5)
        assert listed.status_code == 200 and "a" in listed.text and ".kiln" not in listed.text, listed.text
        x = np.random.default_rng(3).random((2, 16), np.float32)
        for name, weights in MODELS.items():
            response = httpx.post(f"{url}/v1/models/{name}:predict", json={"instances": x.tolist()}, timeout=30)
            assert response.status_code == 200, response.text
            np.testing.assert_allclose(response.json()["predictions"], x @ weights + 1.0, atol=1e-5)
    finally:
        stop(process)
