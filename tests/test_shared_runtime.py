"""Runtime code and weights once (format 2, `--embed-runtime`): the XLA AOT runtime and Kiln's kernels
are one shared library in the servable, every distinct constant is stored once in one weights library,
both checksummed like every file; each bucket library holds only its generated code and links
both. Servables of format 1 (self-contained libraries), generated here by the Kiln that wrote them, still
load. The runtime found by its key instead (format 3, the default): tests/test_runtime_by_key.py."""

from __future__ import annotations

import re
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from runtime.compiler.compile import compile_servable
from runtime.engines import open_servable
from runtime.errors import ServableError
from runtime.manifest import FORMAT_VERSION, read_manifest

ROOT = Path(__file__).resolve().parents[1]
# XLA lays a matmul's weights out transposed at batch 1 (a vector-matrix product), so a bucket of 1
# holds its own, differently ordered copy: two buckets of one layout share one.
BUCKETS = (2, 4)
WEIGHTS = np.random.default_rng(7).standard_normal((16, 8)).astype(np.float32)


def save_model(path: Path, weights: np.ndarray = WEIGHTS) -> Path:
    """y = x @ W + 1: a matmul, so the runtime library carries a kernel."""
    import tensorflow as tf

    module = tf.Module()
    module.w = tf.Variable(weights)

    @tf.function(input_signature=[tf.TensorSpec([None, 16], tf.float32, name="x")])
    def serve(x):
        return {"y": tf.matmul(x, module.w) + 1.0}

    tf.saved_model.save(module, str(path), signatures={"serving_default": serve})
    return path


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    return save_model(tmp_path_factory.mktemp("matmul") / "saved")


@pytest.fixture(scope="module")
def servable(saved_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("servable") / "m" / "1"
    compile_servable(saved_model, out, batch_sizes=BUCKETS, embed_runtime=True)
    return out


def dynamic_symbols(path: Path, *flags: str) -> str:
    return subprocess.run(["nm", "-D", *flags, str(path)], capture_output=True, text=True, check=True).stdout


def expected(x: np.ndarray) -> np.ndarray:
    return x @ WEIGHTS + 1.0


def test_buckets_link_one_runtime_library(servable):
    manifest = read_manifest(servable)
    assert manifest.format_version == 2 and manifest.runtime is not None
    runtime = servable / manifest.runtime.file
    assert manifest.runtime.file in manifest.files and manifest.runtime.key in runtime.name
    assert "XlaCompiledCpuFunction" in dynamic_symbols(runtime, "--defined-only", "-C")
    for library in manifest.signatures["serving_default"].libraries.values():
        needed = subprocess.run(["readelf", "-d", str(servable / library)], capture_output=True, text=True).stdout
        assert runtime.name in needed and "$ORIGIN" in needed
        assert "XlaCompiledCpuFunction" in dynamic_symbols(servable / library, "--undefined-only", "-C")
        assert "XlaCompiledCpuFunction" not in dynamic_symbols(servable / library, "--defined-only", "-C")
        assert (servable / library).stat().st_size < runtime.stat().st_size
    engine = open_servable(servable)
    try:
        for rows in (1, 2, 3, 4, 6):
            x = np.random.default_rng(rows).random((rows, 16), np.float32)
            np.testing.assert_allclose(engine.run("serving_default", {"x": x})["y"], expected(x), atol=1e-5)
    finally:
        engine.close()


def test_the_thread_pool_is_in_the_runtime_and_bucket_libraries_carry_no_assertions(servable):
    """Eigen's pool templates (20 KB) and the shim's assertion strings were most of every bucket
    library of a small model; the pool is now the runtime's, the shim built without assertions."""
    manifest = read_manifest(servable)
    runtime = servable / manifest.runtime.file
    assert "kiln_thread_pool_new" in dynamic_symbols(runtime, "--defined-only")
    assert b"ThreadPoolTempl" in runtime.read_bytes()  # typeinfo names survive stripping
    for library in manifest.signatures["serving_default"].libraries.values():
        code = (servable / library).read_bytes()
        assert "kiln_thread_pool_new" not in dynamic_symbols(servable / library, "--defined-only")
        assert b"ThreadPoolTempl" not in code
        assert b"raw_hash_set.h" not in code and b"xla_compiled_cpu_function.h" not in code


def test_two_buckets_share_one_copy_of_each_weight(servable):
    manifest = read_manifest(servable)
    weights = servable / manifest.weights
    stored = {name: (servable / name).read_bytes() for name in manifest.files}
    layouts = (WEIGHTS.tobytes(), WEIGHTS.T.copy().tobytes())
    copies = {name: sum(data.count(layout) for layout in layouts) for name, data in stored.items()}
    assert copies[manifest.weights] == 1 and sum(copies.values()) == 1, copies
    addresses: dict[str, set[str]] = {}
    for line in dynamic_symbols(weights, "--defined-only").splitlines():
        address, _, name = line.split()
        if name.endswith("_constant_buffer_contents"):
            addresses.setdefault(name.split("_Constant_")[1], set()).add(address)
    assert addresses and all(len(found) == 1 for found in addresses.values()), addresses
    for library in manifest.signatures["serving_default"].libraries.values():
        needed = subprocess.run(["readelf", "-d", str(servable / library)], capture_output=True, text=True).stdout
        assert weights.name in needed


def test_two_servables_with_the_same_symbols_keep_their_own_weights(servable, tmp_path):
    """Both weights libraries name __tfcompile_kiln_s0_b2_Constant_0_...: each bucket library must
    bind its own servable's (the libraries load RTLD_LOCAL; the sonames hash the contents)."""
    other = tmp_path / "other" / "1"
    compile_servable(save_model(tmp_path / "other_saved", -WEIGHTS), other, batch_sizes=BUCKETS, embed_runtime=True)
    first, second = open_servable(servable), open_servable(other)
    try:
        x = np.random.default_rng(1).random((2, 16), np.float32)
        np.testing.assert_allclose(first.run("serving_default", {"x": x})["y"], x @ WEIGHTS + 1.0, atol=1e-5)
        np.testing.assert_allclose(second.run("serving_default", {"x": x})["y"], x @ -WEIGHTS + 1.0, atol=1e-5)
    finally:
        first.close()
        second.close()


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("part", ["runtime", "weights"])
def test_a_corrupted_shared_library_is_refused_by_checksum(servable, tmp_path, part):
    import shutil

    copy = tmp_path / "m" / "1"
    shutil.copytree(servable, copy)
    manifest = read_manifest(copy)
    relative = manifest.runtime.file if part == "runtime" else manifest.weights
    flip_byte(copy / relative, (copy / relative).stat().st_size // 2)
    with pytest.raises(ServableError, match=f"{relative} has sha256"):
        open_servable(copy)
    (copy / relative).write_bytes((copy / relative).read_bytes()[:4096])  # unverified, truncated: no SIGBUS
    with pytest.raises(ServableError, match="truncated"):
        open_servable(copy, verify=False)


def test_inspect_shows_the_shared_code_key_and_the_bytes_saved(servable):
    manifest = read_manifest(servable)
    shown = subprocess.run([sys.executable, "-m", "runtime.cli", "inspect", str(servable)], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    assert manifest.runtime.key in shown
    # Format 1 put the runtime (and the constants) in each of the two bucket libraries: about a runtime more.
    assert manifest.runtime.bytes_saved > manifest.files[manifest.runtime.file].size // 2
    assert re.search(rf"^bytes saved +{manifest.runtime.bytes_saved / 1e6:.1f} MB \(against format 1", shown, re.M)


def format_one_kiln(into: Path) -> Path:
    """The runtime/ of the last commit before format 2, from this checkout's git history."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        introduced = git("log", "--reverse", "--format=%H", "-S", "FORMAT_VERSION = 2", "--",
                         "runtime/manifest.py").partition("\n")[0]  # the first: later ones moved on from 2
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs the git history of this checkout")
    if not introduced:
        pytest.skip("format 2 is not committed yet in this checkout")
    archive = subprocess.run(["git", "archive", f"{introduced}^", "runtime"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def test_a_format_one_servable_still_loads(saved_model, tmp_path):
    old_kiln = format_one_kiln(tmp_path / "old-kiln")
    out = tmp_path / "old" / "1"
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from runtime.compiler.compile import compile_servable; "
                               "compile_servable(sys.argv[1], sys.argv[2], batch_sizes=(2, 4))",
         str(saved_model), str(out)],
        cwd=old_kiln, env={**os.environ, "PYTHONPATH": str(old_kiln)}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = read_manifest(out)
    assert manifest.format_version == 1 and manifest.runtime is None
    assert not any("libkiln_runtime" in name for name in manifest.files)
    engine = open_servable(out)
    try:
        x = np.random.default_rng(0).random((3, 16), np.float32)
        np.testing.assert_allclose(engine.run("serving_default", {"x": x})["y"], expected(x), atol=1e-5)
    finally:
        engine.close()


def test_a_newer_format_is_refused_with_a_message_to_recompile(servable, tmp_path):
    import orjson
    import shutil

    copy = tmp_path / "m" / "1"
    shutil.copytree(servable, copy)
    raw = orjson.loads((copy / "manifest.json").read_bytes())
    raw["format_version"] = FORMAT_VERSION + 1
    (copy / "manifest.json").write_bytes(orjson.dumps(raw))
    with pytest.raises(ServableError, match="recompile it"):
        open_servable(copy)
