"""`kiln inspect` and `kiln predict` (inline JSON, @FILE, standard input) from a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

KILN = [sys.executable, "-m", "runtime.cli"]


def kiln(*args, stdin=None):
    return subprocess.run([*KILN, *args], capture_output=True, text=True, cwd=ROOT, input=stdin, timeout=300)


def test_inspect_prints_the_manifest_as_a_table(digits):
    done = kiln("inspect", str(digits.servable))
    assert done.returncode == 0, done.stderr
    assert "digits version 1" in done.stdout
    assert "serving_default  predict  xla-aot  images:float32[-1, 28, 28, 1]  probabilities:float32[-1, 10]" in done.stdout
    as_json = json.loads(kiln("inspect", str(digits.servable), "--json").stdout)
    assert as_json["name"] == "digits" and as_json["batch_sizes"] == [1, 2, 4, 8, 16, 32]


def test_predict_inline_file_and_stdin_agree(digits, tmp_path):
    image = [[[0.25]] * 28] * 28
    body = json.dumps({"instances": [image, image]})
    (tmp_path / "body.json").write_text(body)
    answers = [kiln("predict", str(digits.servable), "--input", body),
               kiln("predict", str(digits.servable), "--input", f"@{tmp_path / 'body.json'}"),
               kiln("predict", str(digits.servable), "--input", "-", stdin=body)]
    for done in answers:
        assert done.returncode == 0, done.stderr
    predictions = [json.loads(done.stdout)["predictions"] for done in answers]
    assert predictions[0] == predictions[1] == predictions[2]
    assert len(predictions[0]) == 2 and len(predictions[0][0]) == 10
    assert abs(sum(predictions[0][0]) - 1) < 1e-5


def test_predict_columnar_with_named_inputs(examples):
    done = kiln("predict", str(examples["half_plus_two"].servable), "--input", '{"inputs": {"x": [1.0, 2.0, 5.0]}}')
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"outputs": [2.5, 3.0, 4.5]}


def test_predict_errors_are_one_line_without_traceback(digits, tmp_path):
    cases = [("{not json", "malformed JSON"),
             ('{"instances": [[1, 2], [3]]}', "cannot be read as a float32 tensor of one shape"),
             ('{"signature_name": "nope", "instances": [1]}', "signature 'nope' not found"),
             (f"@{tmp_path / 'missing.json'}", "cannot read --input file")]
    for body, message in cases:
        done = kiln("predict", str(digits.servable), "--input", body)
        assert done.returncode == 1
        assert message in done.stderr and "Traceback" not in done.stderr
