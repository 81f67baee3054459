"""Compile on publish: the time from a SavedModel version written into a watched base (renamed into
BASE/NAME/VERSION, as TF Serving users publish) to `kiln serve` answering a prediction with it, through
`kiln compile --watch` (poll, compile, publish) and the server's repository (poll, load, warm-up, swap).
Both run as their own processes on local bases; the compile's own seconds come from the watcher's log.

    python load/compile_on_publish.py [--models half_plus_two,digits] [--versions 3] [--poll-seconds 0.5]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from common import ROOT, example_servables, kiln_serve, pyplot, write_results


def predict_body(servable: Path) -> bytes:
    """A one-row request for the serving signature, zeros of its input's shape."""
    spec = json.loads((servable / "manifest.json").read_text())["signatures"]["serving_default"]["inputs"][0]
    shape = [1 if d is None else d for d in spec["shape"]]

    def zeros(dims):
        return 0.0 if not dims else [zeros(dims[1:]) for _ in range(dims[0])]

    return json.dumps({"inputs": {spec["name"]: zeros(shape)}}).encode()


def answered(port: int, name: str, version: int, body: bytes) -> bool:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models/{name}/versions/{version}:predict", body)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError):
        return False


def publish(saved_model: Path, base: Path, name: str, version: int) -> float:
    staging = base / name / f".incoming-{version}"
    shutil.copytree(saved_model, staging)
    staging.rename(base / name / str(version))
    return time.perf_counter()


def measure(name: str, saved_model: Path, versions: int, poll: float, compile_flags: list[str],
            work: Path) -> list[dict]:
    sources, servables = work / name / "saved_models", work / name / "servables"
    (sources / name).mkdir(parents=True)
    publish(saved_model, sources, name, 1)
    watch = [sys.executable, "-m", "runtime.cli", "compile", "--watch", str(sources), str(servables), *compile_flags]
    subprocess.run([*watch, "--once"], cwd=ROOT, check=True, capture_output=True)
    body = predict_body(servables / name / "1")
    watch_log = work / name / "watch.log"
    results = []
    with kiln_serve(servables, name, work / name / "serve.log", ["--poll-seconds", str(poll)]) as (_, port, _g), \
            watch_log.open("w") as log:
        watcher = subprocess.Popen([*watch, "--poll-seconds", str(poll)], cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT)
        try:
            for version in range(2, versions + 2):
                written = publish(saved_model, sources, name, version)
                deadline = time.monotonic() + 900
                while not answered(port, name, version, body):
                    if time.monotonic() > deadline or watcher.poll() is not None:
                        raise RuntimeError(f"{name} version {version} was not served:\n{watch_log.read_text()}")
                    time.sleep(0.05)
                total = time.perf_counter() - written
                compiled = re.search(rf"{name}/{version} compiled and published in ([\d.]+) s", watch_log.read_text())
                results.append({"version": version, "seconds": total,
                                "compile_seconds": float(compiled[1]) if compiled else None})
                print(name, results[-1], flush=True)
        finally:
            watcher.terminate()
            watcher.wait(60)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="half_plus_two,digits")
    parser.add_argument("--versions", type=int, default=3)
    parser.add_argument("--poll-seconds", type=float, default=0.5, help="the watcher's and the server's")
    parser.add_argument("--compile-flags", default="--signatures serving_default --batch-sizes 1,8")
    parser.add_argument("--out", type=Path, default=ROOT / "load" / "results")
    args = parser.parse_args()
    names = args.models.split(",")
    examples = example_servables(Path(tempfile.mkdtemp(prefix="kiln-publish-examples-")), names)
    results = {"versions": args.versions, "poll_seconds": args.poll_seconds, "compile_flags": args.compile_flags,
               "models": {}}
    with tempfile.TemporaryDirectory(prefix="kiln-compile-on-publish-") as work:
        for name in names:
            runs = measure(name, examples[name].saved_model, args.versions, args.poll_seconds,
                           args.compile_flags.split(), Path(work))
            seconds = [r["seconds"] for r in runs]
            compiles = [r["compile_seconds"] for r in runs if r["compile_seconds"] is not None]
            results["models"][name] = {
                "median_seconds": statistics.median(seconds), "max_seconds": max(seconds),
                "median_compile_seconds": statistics.median(compiles) if compiles else None,
                "compile_fraction": statistics.median(c / s for c, s in zip(compiles, seconds)) if compiles else None,
                "runs": runs}
    write_results("compile_on_publish", results, args.out)
    plot(results, args.out / "compile_on_publish.png")


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(results["models"])
    totals = [results["models"][n]["median_seconds"] for n in names]
    compiles = [results["models"][n]["median_compile_seconds"] or 0 for n in names]
    ax.bar(names, compiles, label="compile (kiln compile)")
    ax.bar(names, [t - c for t, c in zip(totals, compiles)], bottom=compiles, label="polls, publish, load, warm-up")
    ax.set_ylabel("SavedModel written to first served prediction (s, median)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
