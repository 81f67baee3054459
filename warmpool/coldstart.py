"""`kiln coldstart SERVABLE_OR_URL`: one cold start, taken apart into its phases.

A fresh interpreter (warmpool.coldstart_child) loads the servable as the model repository does and
answers one request; these are the phases, back to back, so they add up to the total:

- interpreter: from spawning the process to the first line of the child's code (exec, the
  interpreter's own start-up, site).
- imports: numpy and the runtime modules serving needs (and boto3 for s3:// and gs://).
- fetch: finding the version and, from an object store, downloading it into the servable cache
  (a fresh temporary cache unless --cache-dir names one: a new Lambda or Cloud Run instance starts
  with an empty disk). A local repository is served in place: a few file checks.
- verification: the sha256 of every file against the manifest: the cache hashes what it downloads as
  the bytes arrive (the hashing's time, summed over the download threads, is taken out of fetch),
  the engine what it opens in place (never both).
- library load: the rest of Engine.open: reading the manifest, checking the CPU, dlopen of
  TensorFlow's framework library (which starts in the background and overlaps the verification, as
  it does when serving) and of every bucket's library.
- warm-up: runtime.warmup.warm_up to the depth serving uses (KILN_WARMUP: first by default, the
  servable's own requests or one call at the smallest bucket; all: every signature at every bucket).
- first request: one synthesized request (batch 1) through engine.run.

With --runs N the median of each phase over N processes is reported, with every run kept.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runtime.errors import KilnError

PHASES = ("interpreter", "imports", "fetch", "verification", "library_load", "warm_up", "first_request")
ROOT = Path(__file__).resolve().parents[1]
CHILD = "import time; started = time.perf_counter()\nfrom warmpool.coldstart_child import main; main(started)"


def measure(target: str, *, runs: int = 1, cache_dir: Path | None = None, signature: str | None = None) -> dict:
    """Phases of `runs` cold starts of the servable at target (a directory, BASE/NAME[/VERSION], or
    an s3:// or gs:// URL), medians first; seconds throughout."""
    if runs < 1:
        raise KilnError(f"runs must be at least 1, got {runs}")
    if "://" not in target:
        target = str(Path(target).resolve())
    samples = []
    for _ in range(runs):
        if cache_dir:
            samples.append(_run_once(target, cache_dir, signature))
            continue
        scratch = Path(tempfile.mkdtemp(prefix="kiln-coldstart-"))
        try:
            samples.append(_run_once(target, scratch, signature))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    phases = {name: statistics.median(s["phases"][name] for s in samples) for name in PHASES}
    return {
        "target": target,
        "servable": samples[0]["servable"],
        "runs": runs,
        "phases": phases,
        "total_seconds": statistics.median(s["total_seconds"] for s in samples),
        "peak_rss_mb": max(s["peak_rss_mb"] for s in samples),
        "samples": samples,
    }


def _run_once(target: str, cache_dir: Path, signature: str | None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    spawned = time.perf_counter()
    child = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps([target, str(cache_dir), signature])],
        capture_output=True,
        text=True,
        env=env,
    )
    if child.returncode != 0:
        reason = child.stderr.strip().splitlines()[-1] if child.stderr.strip() else f"exit status {child.returncode}"
        raise KilnError(f"cold start of {target} failed: {reason.removeprefix('error: ')}")
    report = json.loads(child.stdout.strip().splitlines()[-1])
    marks, verification = report["marks"], report["verification"]
    phases = {
        "interpreter": marks["main"] - spawned,
        "imports": marks["imports"] - marks["main"],
        "fetch": marks["fetched"] - marks["imports"] - verification["fetch"],
        "verification": verification["fetch"] + verification["open"],
        "library_load": marks["opened"] - marks["fetched"] - verification["open"],
        "warm_up": marks["warmed"] - marks["opened"],
        "first_request": marks["answered"] - marks["warmed"],
    }
    return {
        "phases": phases,
        "total_seconds": marks["answered"] - spawned,
        "servable": report["servable"],
        "peak_rss_mb": report["peak_rss_kib"] / 1024,
    }


def render(result: dict) -> str:
    """The phases as a table, with their shares of the total."""
    from runtime.table import table

    total = result["total_seconds"]
    rows = [
        (name.replace("_", " "), f"{seconds * 1000:.1f}", f"{100 * seconds / total:.1f}%")
        for name, seconds in result["phases"].items()
    ]
    servable = result["servable"]
    head = (
        f"{servable['name']} version {servable['version']} ({servable['engine']}, {servable['files']} files, "
        f"{servable['bytes'] / 1e6:.1f} MB), signature {servable['signature']}; "
        f"{'median of ' + str(result['runs']) + ' runs' if result['runs'] > 1 else 'one run'}"
    )
    return "\n".join(
        [
            head,
            "",
            table([("phase", "ms", "share"), *rows, ("total", f"{total * 1000:.1f}", "100%")], right=(1, 2)),
            "",
            f"peak RSS {result['peak_rss_mb']:.0f} MB",
        ]
    )
