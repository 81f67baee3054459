"""Each kind of broken servable gives one clear ServableError, and the CLI reports it without a
traceback or a crash."""

from __future__ import annotations

import shutil

import orjson
import pytest

from runtime.engines import open_servable
from runtime.errors import ServableError
from runtime.manifest import FileEntry, sha256_of
from tests.conftest import run_python


@pytest.fixture
def servable(digits, tmp_path):
    copy = tmp_path / "digits" / "1"
    shutil.copytree(digits.servable, copy)
    return copy


def edit_manifest(servable, change):
    path = servable / "manifest.json"
    manifest = orjson.loads(path.read_bytes())
    change(manifest)
    path.write_bytes(orjson.dumps(manifest))


def first_library(servable):
    manifest = orjson.loads((servable / "manifest.json").read_bytes())
    return next(name for name in manifest["files"] if name.endswith(".so"))


def missing_file(servable):
    (servable / first_library(servable)).unlink()
    return "is missing"


def wrong_checksum(servable):
    path = servable / first_library(servable)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return "sha256"


def truncated_library(servable):
    path = servable / first_library(servable)
    path.write_bytes(path.read_bytes()[:4096])
    return "bytes, the manifest says"


def truncated_library_with_matching_manifest(servable):
    """A publisher that checksummed the truncated file: only loading it can tell."""
    name = first_library(servable)
    path = servable / name
    path.write_bytes(path.read_bytes()[:4096])
    entry = FileEntry(sha256=sha256_of(path), size=path.stat().st_size).to_builtins()
    edit_manifest(servable, lambda m: m["files"].__setitem__(name, entry))
    return "is truncated"


def not_a_library(servable):
    """Right size and checksum in the manifest, but not a library at all."""
    name = first_library(servable)
    path = servable / name
    path.write_bytes(b"#!/bin/sh\necho not a library\n" * 10)
    entry = FileEntry(sha256=sha256_of(path), size=path.stat().st_size).to_builtins()
    edit_manifest(servable, lambda m: m["files"].__setitem__(name, entry))
    return "is not a 64-bit little-endian ELF library"


def other_cpu_features(servable):
    """A feature this CPU lacks: machines differ (this one may well have AMX), so pick one it has not."""
    from runtime.cpu import host_features

    lacking = next(f for f in ("amx_tile", "amx_int8", "avx512_vp2intersect", "sha512", "kiln_no_such_feature")
                   if f not in host_features())
    edit_manifest(servable, lambda m: m["target"].__setitem__("features", m["target"]["features"] + [lacking]))
    return f"lacks: {lacking}"


def other_architecture(servable):
    edit_manifest(servable, lambda m: m["target"].__setitem__("triple", "aarch64-unknown-linux-gnu"))
    return "compiled for aarch64"


def unknown_format_version(servable):
    edit_manifest(servable, lambda m: m.__setitem__("format_version", 99))
    return "format_version 99"


def manifest_not_json(servable):
    (servable / "manifest.json").write_bytes(b"{not json")
    return "cannot be read as JSON"


def manifest_invalid(servable):
    edit_manifest(servable, lambda m: m.pop("signatures"))
    return "signatures: is required"


def manifest_missing(servable):
    (servable / "manifest.json").unlink()
    return "manifest.json is missing"


BREAKAGES = [missing_file, wrong_checksum, truncated_library, truncated_library_with_matching_manifest, not_a_library,
             other_cpu_features, other_architecture, unknown_format_version, manifest_not_json,
             manifest_invalid, manifest_missing]


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda f: f.__name__)
def test_broken_servable_is_refused_with_a_clear_error(servable, breakage):
    expected = breakage(servable)
    with pytest.raises(ServableError) as error:
        open_servable(servable)
    assert expected in str(error.value)


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda f: f.__name__)
def test_cli_reports_a_broken_servable_without_traceback(servable, breakage):
    expected = breakage(servable)
    done = run_python("import sys; from runtime.cli import main; sys.exit(main())",
                      "predict", str(servable), "--input", '{"instances": [[[[0.0]]]]}')
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert expected in done.stderr
