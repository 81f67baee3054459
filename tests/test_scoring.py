"""Batch scoring (runtime/scoring/) of local files and of objects in moto's S3 server on loopback,
against the engine called directly on the same rows: JSON Lines and CSV, idempotent reruns, changed
sources, bad rows, broken objects, an unreachable store, sharding, and `kiln score` interrupted by
SIGTERM and run again."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from runtime.app import App
from runtime.errors import ConfigError, InvalidInput, NotFound, StorageError
from runtime.scoring import ScoreResult, expand_inputs, score_object, shard
from runtime.settings import Settings
from runtime.storage import KeyNotFound, open_storage
from tests.conftest import ROOT, free_port


@pytest.fixture(scope="module")
def models(examples, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scoring-models")
    for name in ("half_plus_two", "digits"):
        shutil.copytree(examples[name].servable, root / name / "1")
    return root


@pytest.fixture(scope="module")
def app(models):
    app = App.start(Settings.from_env({}, batching_mode="fixed",
                                      overrides={"model_repository": str(models), "poll_seconds": 0}))
    yield app
    app.repository.stop()


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path):
    """(where inputs go, where results go): local directories, or two prefixes of a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "in"), str(tmp_path / "out")
    _, name = request.getfixturevalue("bucket")
    return f"s3://{name}/in", f"s3://{name}/results"


def put(url: str, data: bytes) -> str:
    parent, _, key = url.rpartition("/")
    if "://" not in parent:
        Path(parent).mkdir(parents=True, exist_ok=True)
    open_storage(parent).write_bytes(key, data)
    return url


def results(result: ScoreResult) -> tuple[dict, list[dict]]:
    """The manifest and every result line, read back through the parts it lists."""
    directory = result.output.rpartition("/")[0]
    store = open_storage(directory)
    manifest = orjson.loads(store.read_bytes("manifest.json"))
    lines = []
    for part in manifest["parts"]:
        data = store.read_bytes(part["key"])
        assert data.endswith(b"\n")
        lines += [json.loads(line) for line in data.splitlines()]  # NaN as TF Serving writes it
    return manifest, lines


def score(app, source: str, out: str, **options) -> ScoreResult:
    return asyncio.run(score_object(app, source, out, **options))


def engine(app, model: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with app.repository.hold(model) as handle:
        return next(iter(handle.engine.run("serving_default", inputs).values()))


def images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 28, 28, 1), dtype=np.float32)


def jsonl(rows) -> bytes:
    return b"".join(orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n" for row in rows)


def predictions(lines: list[dict]) -> np.ndarray:
    assert [line["row"] for line in lines] == list(range(len(lines)))
    return np.array([line["predictions"] for line in lines], dtype=np.float32)


# Scoring correctly -----------------------------------------------------------------------------

def test_digits_jsonl_matches_the_engine(app, place):
    inputs, out = place
    x = images(300)
    source = put(f"{inputs}/batch/digits.jsonl", b"".join(orjson.dumps(row.tolist()) + b"\n" for row in x))
    result = score(app, source, out, model="digits", chunk_rows=64, part_rows=128)
    assert (result.rows, result.errors, result.skipped) == (300, 0, False)
    bucket_or_path = source.removeprefix("s3://") if source.startswith("s3://") else source.lstrip("/")
    assert result.output == f"{open_storage(out).url}/{bucket_or_path}.predictions/manifest.json"
    manifest, lines = results(result)
    assert [part["rows"] for part in manifest["parts"]] == [128, 128, 44]
    assert (manifest["rows"], manifest["errors"], manifest["model"], manifest["version"]) == (300, 0, "digits", 1)
    np.testing.assert_allclose(predictions(lines), engine(app, "digits", {"images": x}), rtol=1e-6, atol=1e-7)


def test_digits_csv_of_pixel_columns_and_of_json_cells(app, place):
    inputs, out = place
    x = images(40, seed=1)
    header = ",".join(f"pixel{i}" for i in range(784))
    flat = "\n".join([header, *(",".join(str(v) for v in row.ravel()) for row in x)]) + "\n"
    cells = "images\n" + "".join(f'"{json.dumps(row.tolist())}"\n' for row in x)  # quoted: the JSON has commas
    expected = engine(app, "digits", {"images": x})
    for name, text in (("flat.csv", flat), ("cells.csv", cells)):
        result = score(app, put(f"{inputs}/{name}", text.encode()), out, model="digits")
        assert (result.rows, result.errors) == (40, 0), results(result)[1][:1]
        np.testing.assert_allclose(predictions(results(result)[1]), expected, rtol=1e-6, atol=1e-7)


def test_half_plus_two_rows_in_every_format(app, place):
    inputs, out = place
    values = [0.0, 1.0, -3.5, 1e6, 2.25]
    expected = [v / 2 + 2 for v in values]
    sources = {
        "values.jsonl": jsonl(values),
        "objects.ndjson": jsonl({"x": v} for v in values),
        "named.csv": ("x\n" + "\n".join(map(str, values)) + "\n").encode(),
        "crlf-bom.csv": ("\ufeffx\r\n" + "\r\n".join(map(str, values)) + "\r\n").encode(),
        "compressed.jsonl.gz": gzip.compress(jsonl(values)),
        "blank-lines.jsonl": b"\n" + b"\n\n  \n".join(orjson.dumps(v) for v in values) + b"\n\n",
    }
    for name, data in sources.items():
        result = score(app, put(f"{inputs}/{name}", data), out, model="half_plus_two")
        assert (result.rows, result.errors) == (5, 0), name
        np.testing.assert_allclose(predictions(results(result)[1]), expected, err_msg=name)


def part_bytes(result: ScoreResult) -> bytes:
    return open_storage(result.output.rpartition("/")[0]).read_bytes(results(result)[0]["parts"][0]["key"])


def test_nan_and_infinity_are_read_bare_and_written_as_strict_json_strings(app, tmp_path):
    """Results are strict JSON (what the Lambda handler writes too): NaN and Infinity as strings."""
    source = put(str(tmp_path / "special.jsonl"), b"NaN\nInfinity\n-Infinity\n1.0\n")
    data = part_bytes(score(app, source, str(tmp_path / "out"), model="half_plus_two"))
    assert data == (b'{"row":0,"predictions":"NaN"}\n{"row":1,"predictions":"Infinity"}\n'
                    b'{"row":2,"predictions":"-Infinity"}\n{"row":3,"predictions":2.5}\n')
    assert [orjson.loads(line)["predictions"] for line in data.splitlines()] == ["NaN", "Infinity", "-Infinity", 2.5]


def test_rows_beside_a_nan_row_keep_their_float_formatting(app, tmp_path):
    """Rows decoded together run as one group: a NaN among them changes nothing about the others
    (float32 2.05 stays 2.05, not 2.049999952316284)."""
    source = put(str(tmp_path / "objects.jsonl"), b'{"x": 0.1}\n{"x": NaN}\n{"x": 0.1}\n')
    data = part_bytes(score(app, source, str(tmp_path / "out"), model="half_plus_two"))
    assert data == b'{"row":0,"predictions":2.05}\n{"row":1,"predictions":"NaN"}\n{"row":2,"predictions":2.05}\n'


def test_the_model_defaults_to_the_only_one_and_several_need_a_name(app):
    with pytest.raises(ConfigError, match="several models are served .*digits, half_plus_two"):
        app.repository.named_or_only(None)
    assert app.repository.named_or_only("digits") == "digits"
    with pytest.raises(NotFound, match="'nope' is not served"):
        app.repository.named_or_only("nope")


# Idempotency -----------------------------------------------------------------------------------

def test_a_rerun_is_skipped_and_leaves_the_results_untouched(app, bucket):
    client, name = bucket
    source = put(f"s3://{name}/in/rows.jsonl", jsonl([1.0, 2.0, 3.0]))
    first = score(app, source, f"s3://{name}/out", model="half_plus_two")
    before = {item["Key"]: (item["ETag"], item["LastModified"])
              for item in client.list_objects_v2(Bucket=name, Prefix="out/")["Contents"]}
    time.sleep(1.1)  # LastModified has one-second resolution
    again = score(app, source, f"s3://{name}/out", model="half_plus_two")
    assert again == ScoreResult(source, first.output, 0, True)
    after = {item["Key"]: (item["ETag"], item["LastModified"])
             for item in client.list_objects_v2(Bucket=name, Prefix="out/")["Contents"]}
    assert after == before and len(before) == 2  # one part and the manifest


def test_a_changed_source_is_scored_again_and_its_old_parts_go(app, place):
    inputs, out = place
    source = put(f"{inputs}/rows.jsonl", jsonl([1.0, 2.0, 3.0, 4.0, 5.0]))
    first = score(app, source, out, model="half_plus_two", part_rows=2)
    time.sleep(0.01)
    put(source, jsonl([10.0, 20.0]))
    second = score(app, source, out, model="half_plus_two", part_rows=2)
    assert (second.skipped, second.rows) == (False, 2)
    manifest, lines = results(second)
    assert predictions(lines).tolist() == [7.0, 12.0]
    directory = open_storage(second.output.rpartition("/")[0])
    assert directory.list_keys() == sorted(["manifest.json", *(part["key"] for part in manifest["parts"])])
    assert first.output == second.output


def test_a_rerun_after_an_interruption_keeps_finished_parts(app, tmp_path):
    source = put(str(tmp_path / "in.jsonl"), jsonl(float(i) for i in range(100)))
    out = tmp_path / "out"
    result = score(app, source, str(out), model="half_plus_two", part_rows=30, chunk_rows=7)
    directory = Path(result.output.removeprefix("file://")).parent
    manifest, lines = results(result)
    parts = [directory / part["key"] for part in manifest["parts"]]
    # As an interruption leaves it: the first two parts written, the others and the manifest not.
    for path in (*parts[2:], directory / "manifest.json"):
        path.unlink()
    kept = {path: path.stat().st_mtime_ns for path in parts[:2]}
    again = score(app, source, str(out), model="half_plus_two", part_rows=30, chunk_rows=7)
    assert (again.rows, again.skipped) == (100, False)
    assert {path: path.stat().st_mtime_ns for path in parts[:2]} == kept
    assert results(again)[1] == lines


def test_results_are_never_scored_themselves(app, bucket):
    _, name = bucket
    source = put(f"s3://{name}/data/rows.jsonl", jsonl([1.0]))
    result = score(app, source, f"s3://{name}/data/out", model="half_plus_two")
    part = f"{result.output.rpartition('/')[0]}/{results(result)[0]['parts'][0]['key']}"
    assert score(app, part, f"s3://{name}/elsewhere", model="half_plus_two") == ScoreResult(part, "", 0, True)
    assert score(app, result.output, f"s3://{name}/data/out") == ScoreResult(result.output, "", 0, True)


# Bad rows and broken objects -------------------------------------------------------------------

def test_bad_rows_become_error_lines_naming_them(app, place):
    inputs, out = place
    good = images(3, seed=2)
    rows = [orjson.dumps(good[0].tolist()),
            b'[[[0.5]]',  # cut in half
            orjson.dumps(good[1][:27].tolist()),  # 27 lines of pixels, not 28
            b'"a string"',
            b'{"pixels": [1, 2]}',  # no such input
            b'[\xff\xfe]',  # not UTF-8
            orjson.dumps(good[2].tolist()),
            orjson.dumps(good[2].tolist())[:2000]]  # the object cut short: its last line is half a row
    result = score(app, put(f"{inputs}/mixed.jsonl", b"\n".join(rows)), out, model="digits")
    assert (result.rows, result.errors) == (8, 6)
    _, lines = results(result)
    assert [line["row"] for line in lines] == list(range(8))
    errors = {line["row"]: line["error"] for line in lines if "error" in line}
    assert sorted(errors) == [1, 2, 3, 4, 5, 7]
    assert "mixed.jsonl, line 2: malformed JSON" in errors[1]
    assert "line 3: input 'images' must have shape" in errors[2] and "28, 28, 1" in errors[2]
    assert "line 4" in errors[3] and "float32" in errors[3]
    assert "line 5" in errors[4] and "unknown input(s) pixels" in errors[4]
    assert "line 6: malformed JSON" in errors[5] and "UTF-8" in errors[5]
    assert "line 8: malformed JSON" in errors[7]
    assert all(lines[row]["line"] == row + 1 for row in errors)
    expected = engine(app, "digits", {"images": good[[0, 2]]})
    np.testing.assert_allclose([lines[0]["predictions"], lines[6]["predictions"]], expected, rtol=1e-6, atol=1e-7)


def test_an_overlong_line_is_an_error_row_never_read_whole(app, tmp_path, monkeypatch):
    import runtime.scoring.formats

    monkeypatch.setattr(runtime.scoring.formats, "MAX_LINE_BYTES", 64)
    text = b"1.0\n[" + b"1," * 100 + b"1]\n2.0\n" + b" " * 200 + b"3.0"
    result = score(app, put(str(tmp_path / "long.jsonl"), text), str(tmp_path / "out"), model="half_plus_two")
    _, lines = results(result)
    assert [line.get("predictions") for line in lines] == [2.5, None, 3.0, None]
    assert lines[1]["error"].endswith("long.jsonl, line 2: the line is longer than 64 bytes")
    assert lines[3]["line"] == 4 and (result.rows, result.errors) == (4, 2)


def test_bad_csv_records_become_error_lines(app, tmp_path):
    text = 'x\n1.0\n"2.0\n3.0\n4.0,"x"y\n5.0\nabc\n6.0,7.0\n\n8.0\n'
    result = score(app, put(str(tmp_path / "bad.csv"), text.encode() + b"\xff\n9.0\n"), str(tmp_path / "out"),
                   model="half_plus_two")
    _, lines = results(result)
    by_row = {line["row"]: line for line in lines}
    assert by_row[0]["predictions"] == 2.5
    assert "bad.csv, line 3: the CSV record (lines 3-5) does not parse: ',' expected" in by_row[1]["error"]
    assert by_row[2]["predictions"] == 4.5
    assert "line 7: column 'x': cannot read 'abc' as float32" in by_row[3]["error"]
    assert "line 8: the record has 2 fields; the header has 1" in by_row[4]["error"]
    assert by_row[5]["predictions"] == 6.0 and by_row[5]["row"] == 5
    assert "line 11: the record is not valid UTF-8" in by_row[6]["error"]
    assert by_row[7]["predictions"] == 6.5
    assert (result.rows, result.errors) == (8, 4)


@pytest.mark.parametrize("name, data, message", [
    ("rows.parquet", b"PAR1", r"cannot score this object: expected a name ending in \.jsonl, \.ndjson or \.csv"),
    ("rows.jsonl.gz", b"not gzip at all", "the gzip stream is corrupt or truncated"),
    ("rows.jsonl.gz", gzip.compress(b"1.0\n2.0\n" * 1000)[:-40], "the gzip stream is corrupt or truncated"),
    ("rows.csv", b"a,b\n1,2\n", r"the CSV header \(line 1\) has 2 columns \(a, b\); expected columns named by "
                                r"the inputs \(x\), or 1 columns"),
])
def test_a_broken_object_fails_as_a_whole_with_a_clear_error(app, tmp_path, name, data, message):
    with pytest.raises(InvalidInput, match=message) as error:
        score(app, put(str(tmp_path / name), data), str(tmp_path / "out"), model="half_plus_two")
    assert name in str(error.value)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("manifest.json"))


def test_a_missing_object_and_an_unknown_signature(app, bucket, tmp_path):
    _, name = bucket
    with pytest.raises(KeyNotFound, match=f"s3://{name}/nothing.jsonl: no such key"):
        score(app, f"s3://{name}/nothing.jsonl", f"s3://{name}/out", model="digits")
    with pytest.raises(InvalidInput, match="signature 'nope' not found in model digits"):
        score(app, put(str(tmp_path / "a.jsonl"), b"1\n"), str(tmp_path / "out"), model="digits", signature="nope")


def test_an_unreachable_store_fails_with_a_storage_error_not_a_hang(app, s3_env, tmp_path):
    s3_env(f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(StorageError, match=r"reading s3://bucket/rows.jsonl failed after \d+ attempt"):
        score(app, "s3://bucket/rows.jsonl", str(tmp_path / "out"), model="digits")
    assert time.monotonic() - started < 60


def test_an_unwritable_output_fails_the_object(app, tmp_path):
    (tmp_path / "out").write_text("a file where the results directory should go")
    with pytest.raises(StorageError, match="cannot write"):
        score(app, put(str(tmp_path / "in" / "rows.jsonl"), b"1.0\n"), str(tmp_path / "out"), model="half_plus_two")


# Finding inputs and sharing them out -----------------------------------------------------------

def test_expand_inputs_finds_rows_objects_under_directories_and_prefixes(bucket, tmp_path):
    client, name = bucket
    for key in ("b/2.csv", "a.jsonl", "b/1.ndjson.gz", "b/notes.txt", "a.jsonl.predictions/part-00000-0.jsonl"):
        put(str(tmp_path / key), b"")
        client.put_object(Bucket=name, Key=f"p/{key}", Body=b"")
    local = [str(tmp_path / key) for key in ("a.jsonl", "b/1.ndjson.gz", "b/2.csv")]
    assert expand_inputs([str(tmp_path)]) == local
    assert expand_inputs([str(tmp_path / "b" / "2.csv"), str(tmp_path)]) == [local[2], *local[:2]]
    remote = [f"s3://{name}/p/{key}" for key in ("a.jsonl", "b/1.ndjson.gz", "b/2.csv")]
    assert expand_inputs([f"s3://{name}/p"]) == remote
    assert expand_inputs([f"s3://{name}/p/b/"]) == remote[1:]
    assert expand_inputs([f"s3://{name}/p/a.jsonl"]) == remote[:1]
    with pytest.raises(InvalidInput, match="no such file or directory"):
        expand_inputs([str(tmp_path / "missing")])
    with pytest.raises(InvalidInput, match=f"no .jsonl, .ndjson or .csv objects .* under s3://{name}/q"):
        expand_inputs([f"s3://{name}/q"])


def test_shards_cover_every_item_exactly_once():
    items = [f"s3://bucket/part-{i:04d}.jsonl" for i in range(200)]
    for count in range(1, 9):
        shares = [shard(items, index, count) for index in range(count)]
        assert sorted(item for share in shares for item in share) == items
        assert all(share == [item for item in items if item in share] for share in shares)  # order kept
        assert shares == [shard(list(items), index, count) for index in range(count)]  # deterministic
    # An item's task does not depend on the other items: tasks that listed different items agree.
    assert shard(items[:150], 1, 4) == [item for item in shard(items, 1, 4) if item in items[:150]]
    assert min(len(shard(items, index, 4)) for index in range(4)) > 30
    for index, count in ((4, 4), (-1, 2), (0, 0)):
        with pytest.raises(ConfigError, match="task index"):
            shard(items, index, count)


# kiln score ------------------------------------------------------------------------------------

def kiln_score(*args: str) -> subprocess.Popen:
    env = {**os.environ, "KILN_LOG_LEVEL": "WARNING"}
    return subprocess.Popen([sys.executable, "-m", "runtime.cli", "score", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kiln_score_interrupted_by_sigterm_then_run_again_finishes_without_duplicates(models, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    rows = {}
    for i in range(16):
        x = images(150, seed=10 + i)
        name = f"day-{i:02d}.jsonl" if i % 2 else f"sub/day-{i:02d}.jsonl"
        put(str(inputs / name), jsonl(x))
        rows[name] = x
    command = (str(inputs), "--out", str(out), "--model-repository", str(models), "--model", "digits",
               "--part-rows", "64", "--inputs-at-once", "1")
    process = kiln_score(*command)
    deadline = time.monotonic() + 120
    while not list(out.rglob("manifest.json")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    finished_first = {orjson.loads(line)["source"] for line in stdout.splitlines()}
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted" in stderr and "run the same command again" in stderr
    assert 0 < len(finished_first) < 16
    assert not list(out.rglob("*.partial"))  # in-flight writes finished or were not started

    process = kiln_score(*command)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    second = [orjson.loads(line) for line in stdout.splitlines()]
    assert {line["source"] for line in second if line["skipped"]} == finished_first
    assert f"{16 - len(finished_first)} scored, {len(finished_first)} skipped" in stderr
    for name, x in rows.items():
        directory = out / f"{name}.predictions"
        manifest = orjson.loads((directory / "manifest.json").read_bytes())
        lines = [orjson.loads(line) for part in manifest["parts"]
                 for line in (directory / part["key"]).read_bytes().splitlines()]
        assert sorted(p.name for p in directory.iterdir()) == sorted(
            ["manifest.json", *(part["key"] for part in manifest["parts"])])
        assert manifest["rows"] == len(lines) == 150
        assert predictions(lines).shape == (150, 10)


def test_kiln_score_of_nan_rows_interrupted_then_resumed(models, tmp_path):
    """Finished parts holding NaN and Infinity are read back on resume, not refused."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    count = 40_000
    values = ["NaN" if i % 7 == 3 else "Infinity" if i % 11 == 5 else f"{i}.0" for i in range(count)]
    put(str(inputs / "special.jsonl"), "".join(f"{value}\n" for value in values).encode())
    command = (str(inputs), "--out", str(out), "--model-repository", str(models), "--model", "half_plus_two",
               "--part-rows", "50", "--chunk-rows", "5")
    directory = out / "special.jsonl.predictions"
    process = kiln_score(*command)
    deadline = time.monotonic() + 120
    while not list(directory.glob("part-*.jsonl")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    finished = sorted(directory.glob("part-*.jsonl"))
    assert finished and not (directory / "manifest.json").exists()
    kept = {path: path.stat().st_mtime_ns for path in finished}

    process = kiln_score(*command)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert {path: path.stat().st_mtime_ns for path in finished} == kept  # resumed, not rescored
    manifest = orjson.loads((directory / "manifest.json").read_bytes())
    lines = [orjson.loads(line) for part in manifest["parts"]
             for line in (directory / part["key"]).read_bytes().splitlines()]
    assert [line["row"] for line in lines] == list(range(count)) and manifest["errors"] == 0
    expected = [value if value in ("NaN", "Infinity") else float(value) / 2 + 2 for value in values]
    assert [line["predictions"] for line in lines] == expected


def test_kiln_score_needs_an_output_and_reports_a_failed_input(models, tmp_path):
    put(str(tmp_path / "in" / "good.jsonl"), b"1.0\n")
    put(str(tmp_path / "in" / "bad.csv"), b"a,b\n1,2\n")
    process = kiln_score(str(tmp_path / "in"), "--model-repository", str(models), "--model", "half_plus_two")
    assert process.communicate(timeout=120)[1].strip() == (
        "kiln score: error: no output prefix: pass --out or set KILN_OUTPUT_PREFIX")
    assert process.returncode == 1
    process = kiln_score(str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--model-repository", str(models),
                         "--model", "half_plus_two")
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    assert "bad.csv: error:" in stderr and "CSV header" in stderr
    assert "1 scored, 0 skipped (results exist), 1 failed of 2 inputs; 1 rows" in stderr
    assert [orjson.loads(line)["rows"] for line in stdout.splitlines()] == [1]


def test_scoring_does_not_import_boto3_for_local_work():
    from tests.conftest import run_python

    done = run_python("import sys, runtime.scoring; print('boto3' in sys.modules, 'tensorflow' in sys.modules)")
    assert done.stdout.strip() == "False False", done.stderr


def test_the_progress_bar_draws_only_on_a_terminal():
    import io

    from runtime.progress import ProgressBar

    quiet = io.StringIO()
    bar = ProgressBar(1000, 2, stream=quiet)
    bar.advance(10, 500)
    bar.item_done()
    bar.message("a line")
    bar.close()
    assert quiet.getvalue() == "a line\n"
    line = bar.line(80)
    assert len(line) <= 80 and " 50%" in line and "1/2 inputs 10 rows " in line  # tqdm's format
    shown = io.StringIO()
    bar = ProgressBar(1000, 1, stream=shown, enabled=True)
    bar.advance(1, 1000)
    bar.item_done()
    bar.message("between")
    bar.close()
    drawn = shown.getvalue()
    assert drawn.startswith("\r") and "100%" in drawn and "1/1 inputs 1 rows" in drawn
    assert "between\n" in drawn  # written above the bar, which is redrawn after it
