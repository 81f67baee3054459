"""Graviton (aarch64) servables, built on this x86-64 machine (issue 20).

Nothing here runs on Arm hardware: the aarch64 code runs under QEMU user-mode emulation (Debian's
qemu-user) through a native harness cross-compiled for aarch64 that calls the shim
(runtime/compiler/emulate.py). Its outputs are held to TensorFlow's on x86 within 1e-5: digits and
half_plus_two at every bucket; mobilenet_v2 and tiny_lm at their two smallest buckets, since their
large buckets take minutes under emulation (load/graviton_parity.py runs every example at every bucket).
A servable holding both architectures is served over the real server on x86 from its x86 code; one
holding only aarch64 is refused, naming the architecture.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from load.graviton_parity import TOLERANCE, build_for, compare
from runtime.errors import CompileError, ServableError
from runtime.manifest import read_manifest
from tests.conftest import ROOT, kiln_serve

AARCH64 = "aarch64-unknown-linux-gnu"


@pytest.fixture(scope="module")
def mixed(examples, tmp_path_factory):
    """digits and half_plus_two for this machine and for Graviton 2, in one servable each."""
    return build_for({name: examples[name] for name in ("digits", "half_plus_two")},
                     tmp_path_factory.mktemp("mixed"), ["native", "neoverse-n1"])


@pytest.fixture(scope="module")
def aarch64_only(examples, tmp_path_factory):
    """mobilenet_v2 and tiny_lm for Graviton 3 only, at their two smallest buckets."""
    return build_for({name: examples[name] for name in ("mobilenet_v2", "tiny_lm")},
                     tmp_path_factory.mktemp("aarch64"), ["neoverse-v1"], (1, 2))


@pytest.mark.parametrize("name", ["digits", "half_plus_two"])
def test_mixed_servable_aarch64_code_matches_tensorflow_at_every_bucket(mixed, name):
    manifest = read_manifest(mixed[name].servable)
    rows = compare(mixed[name], manifest.batch_sizes)
    compiled = [key for key, sig in manifest.signatures.items() if sig.engine == "xla-aot" and sig.host is None]
    assert len(rows) == len(compiled) * len(manifest.batch_sizes) > 0
    worst = max(rows, key=lambda row: row["max_abs_diff"])
    assert worst["max_abs_diff"] <= TOLERANCE, worst


@pytest.mark.parametrize("name", ["mobilenet_v2", "tiny_lm"])
def test_aarch64_code_matches_tensorflow(aarch64_only, name):
    rows = compare(aarch64_only[name], (1, 2))
    assert {row["bucket"] for row in rows} == {1, 2}
    worst = max(rows, key=lambda row: row["max_abs_diff"])
    assert worst["max_abs_diff"] <= TOLERANCE, worst


def elf_machine(path) -> int:
    return struct.unpack_from("<H", path.read_bytes()[:20], 18)[0]


def test_mixed_manifest_keeps_each_architecture_in_its_own_libraries(mixed):
    servable = mixed["digits"].servable
    manifest = read_manifest(servable)
    assert [target.triple for target in manifest.targets] == ["x86_64-pc-linux", AARCH64]
    arm = manifest.for_architecture("aarch64")
    assert arm.target.cpu == "neoverse-n1" and "asimddp" in arm.target.features
    for bucket, library in arm.signatures["serving_default"].libraries.items():
        assert library.startswith(f"lib/{AARCH64}/") and elf_machine(servable / library) == 183  # EM_AARCH64
        assert elf_machine(servable / manifest.signatures["serving_default"].libraries[bucket]) == 62  # EM_X86_64
    assert arm.runtime.file.startswith(f"lib/{AARCH64}/") and arm.weights.startswith(f"lib/{AARCH64}/")
    shown = subprocess.run([sys.executable, "-m", "runtime.cli", "inspect", str(servable)], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout
    assert "target (x86_64)" in shown and f"target (aarch64)  {AARCH64} cpu=neoverse-n1" in shown


def test_mixed_servable_serves_on_x86_and_aarch64_only_is_refused(examples, mixed, aarch64_only, tmp_path):
    """Over the real server: the mixed servables answer from their x86 code; an aarch64-only
    version never becomes available, and its status says why."""
    import shutil

    shutil.copytree(aarch64_only["mobilenet_v2"].servable, tmp_path / "arm_only" / "1")
    with kiln_serve(mixed, tmp_path, "--poll-seconds", "0") as (_, url):
        images = np.random.default_rng(1).random((3, 28, 28, 1)).astype(np.float32)
        answer = httpx.post(f"{url}/v1/models/digits:predict", json={"instances": images.tolist()}, timeout=60)
        assert answer.status_code == 200, answer.text
        import tensorflow as tf

        expected = tf.saved_model.load(str(examples["digits"].saved_model)).signatures["serving_default"](
            images=tf.constant(images))["probabilities"].numpy()
        assert np.abs(np.array(answer.json()["predictions"]) - expected).max() <= TOLERANCE
        halves = httpx.post(f"{url}/v1/models/half_plus_two:predict", json={"instances": [1.0, 2.0, 5.0]}, timeout=60)
        assert halves.json() == {"predictions": [2.5, 3.0, 4.5]}
        deadline = time.monotonic() + 120
        while (status := httpx.get(f"{url}/v1/models/arm_only", timeout=10).json()["model_version_status"][0])[
                "state"] != "END" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status["state"] == "END" and status["status"]["error_code"] == "UNKNOWN"
        assert AARCH64 in status["status"]["error_message"] and "x86_64" in status["status"]["error_message"]
        refused = httpx.post(f"{url}/v1/models/arm_only:predict", json={"instances": [[0.0]]}, timeout=10)
        assert refused.status_code in (404, 503) and "error" in refused.json()


def test_aarch64_only_servable_is_refused_on_x86(aarch64_only):
    from runtime.engines import open_servable

    with pytest.raises(ServableError, match=f"compiled for {AARCH64} but this machine is x86_64"):
        open_servable(aarch64_only["tiny_lm"].servable)


def test_two_cpus_of_one_architecture_are_refused_before_compiling(examples, tmp_path):
    from runtime.compiler.compile import compile_servable

    with pytest.raises(CompileError, match="two CPUs of one architecture"):
        compile_servable(examples["digits"].saved_model, tmp_path / "digits", target_cpu=["neoverse-n1", "neoverse-v1"])
    assert not (tmp_path / "digits").exists()


def test_a_build_missing_a_signature_is_an_invalid_manifest(mixed, tmp_path):
    import json
    import shutil

    servable = tmp_path / "digits"
    shutil.copytree(mixed["digits"].servable, servable)
    manifest = json.loads((servable / "manifest.json").read_text())
    manifest["builds"][0]["libraries"] = {}
    (servable / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ServableError, match=f"the {AARCH64} build has libraries for \\[\\], not for the compiled "
                                            f"signatures \\['serving_default'\\]"):
        read_manifest(servable)


def test_a_missing_cross_compiler_is_named(monkeypatch):
    from runtime.compiler import target
    from runtime.compiler.target import resolve_target

    monkeypatch.setitem(target.CROSS_COMPILERS, "aarch64", "no-such-aarch64-g++")
    with pytest.raises(CompileError, match="--target-cpu 'neoverse-n1' needs the compiler no-such-aarch64-g\\+\\+"):
        resolve_target("neoverse-n1")
