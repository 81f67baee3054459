"""`kiln coldstart`: one cold start of the digits example in a fresh interpreter, phase by phase, from a
local repository and from an S3-compatible store (moto's server over HTTP)."""

from __future__ import annotations

import json

import pytest

from runtime.cli import main
from tests.test_storage import upload
from warmpool.coldstart import PHASES


def coldstart(capsys, *args: str) -> dict:
    assert main(["coldstart", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def check_phases(result: dict) -> None:
    phases = result["phases"]
    assert list(phases) == list(PHASES)
    assert all(seconds > 0 for seconds in phases.values()), phases
    assert sum(phases.values()) == pytest.approx(result["total_seconds"], rel=1e-6)  # back to back
    for sample in result["samples"]:
        assert sum(sample["phases"].values()) == pytest.approx(sample["total_seconds"], rel=1e-6)


def test_local_servable_phases(digits, capsys):
    result = coldstart(capsys, str(digits.servable), "--runs", "2")
    check_phases(result)
    assert result["servable"] == {"name": "digits", "version": 1, "engine": "xla-aot", "signature": "serving_default",
                                  "files": result["servable"]["files"], "bytes": result["servable"]["bytes"]}
    assert result["runs"] == 2 and len(result["samples"]) == 2
    # Served in place: fetching is a few file checks, hashing the files is real work.
    assert result["phases"]["fetch"] < result["phases"]["verification"]
    assert main(["coldstart", str(digits.servable)]) == 0
    table = capsys.readouterr().out
    for label in ("interpreter", "imports", "fetch", "verification", "library load", "warm up", "first request",
                  "total", "peak RSS"):
        assert label in table


def test_s3_servable_phases(digits, bucket, capsys, tmp_path):
    client, name = bucket
    upload(client, name, digits.servable, "models/digits/3")
    cache = tmp_path / "cache"
    result = coldstart(capsys, f"s3://{name}/models/digits", "--cache-dir", str(cache))  # the newest version
    check_phases(result)
    assert result["servable"]["version"] == 1  # the manifest's own number; the store's directory is 3
    assert any(cache.rglob("manifest.json"))  # downloaded and verified into the cache named


def test_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "models" / "empty" / "1").mkdir(parents=True)
    assert main(["coldstart", str(tmp_path / "models" / "empty" / "1")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("kiln coldstart: error: cold start of ") and "has no manifest.json" in error
    assert error.count("\n") == 1
