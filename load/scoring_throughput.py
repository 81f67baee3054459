"""Batch scoring throughput: rows per second of score_object over a JSON Lines object in an
S3-compatible store (read, decode, run through App.execute and the micro-batcher, encode, write
the results back) against the engine called directly on the same rows already decoded (its best
bucket, one caller, in this process), in interleaved rounds after an uncounted warm-up round.

Two more lines show where the limit is: decoding alone (the same rows through scoring's own
decoder, from bytes in memory), and decode-then-engine one after the other (what one thread doing
both would reach: score_object overlaps them, the engine running in worker threads while the next
chunk decodes). The rows are the example model's own 28x28 digits as a TF Serving client writes
them (json of the nested lists, `x.tolist()`), cycled to --rows. The batcher runs as many batches at once as there are CPUs, so
the engine is also measured from that many calling threads ("engine_parallel").

The store is moto's standalone server on loopback in its own process. With --profile-seconds,
py-spy samples this process during one more scoring round: the top frames by own time and the
stages of scoring they belong to.

    python load/scoring_throughput.py [--rows 20000] [--rounds 7] [--profile-seconds 10] [--out load/results]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, example_servables, moto_server, pyplot, read_py_spy, write_results

BUCKET = "kiln-scoring-benchmark"
MODEL = "digits"
KEY = "serving_default"
SAMPLES_PER_SECOND = 100
# The stage of scoring a sample belongs to: the innermost frame of a known place.
STAGES = (("engine (compiled code, calling thread)", ("runtime/engines/",)),
          ("decode rows (JSON -> arrays)", ("_fast (runtime/scoring", "_parse (runtime/scoring", "_decode (runtime/",
                                            "_arrays (runtime/scoring", "runtime/codecs/tfserving.py:decode",
                                            "_instances (runtime/scoring")),
          ("read lines (S3 stream, split)", ("_records (runtime/scoring", "runtime/storage.py", "botocore/",
                                             "urllib3/", "http/client.py", "socket.py", "ssl.py")),
          ("encode results (arrays -> JSON lines)", ("prediction_lines (runtime/scoring", "_jsonable (")),
          ("write parts", ("_write_part (runtime/scoring",)),
          ("batcher and app", ("runtime/batcher.py", "runtime/app.py", "runtime/metrics.py", "prometheus_client/")),
          ("event loop and threads", ("asyncio/", "concurrent/futures/", "threading.py", "selectors.py")))
WAITS = ("_worker (concurrent/futures/thread.py)", "Condition.wait (threading.py)", "wait (threading.py)",
         "EpollSelector.select (selectors.py)", "select (selectors.py)")


def digits_rows(count: int):
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from examples.digits import load_images

    images, _ = load_images()
    return images[np.arange(count) % len(images)]


def engine_rate(engine, x, bucket: int, callers: int = 1) -> float:
    """Rows/s of engine.run over x in batches of `bucket`, from `callers` threads taking turns."""
    from concurrent.futures import ThreadPoolExecutor

    starts = range(0, len(x), bucket)
    started = time.perf_counter()
    if callers == 1:
        for start in starts:
            engine.run(KEY, {"images": x[start:start + bucket]})
    else:
        with ThreadPoolExecutor(callers) as pool:
            list(pool.map(lambda start: engine.run(KEY, {"images": x[start:start + bucket]}), starts))
    return len(x) / (time.perf_counter() - started)


def decode_all(data: bytes, signature, chunk_rows: int) -> tuple[list, float]:
    """Scoring's own decoder over the bytes: the decoded chunks and the seconds it took."""
    from runtime.scoring.formats import JsonLines

    rows = JsonLines(io.BufferedReader(io.BytesIO(data)), "memory", signature)
    chunks = []
    started = time.perf_counter()
    while (chunk := rows.take(chunk_rows)).count:
        chunks.append(chunk)
    return chunks, time.perf_counter() - started


def decode_then_engine(engine, data: bytes, signature, chunk_rows: int, bucket: int) -> tuple[float, float]:
    """(rows/s decoding alone, rows/s decoding then running, one after the other)."""
    chunks, decoding = decode_all(data, signature, chunk_rows)
    rows = sum(chunk.count for chunk in chunks)
    started = time.perf_counter()
    for chunk in chunks:
        for _, inputs in chunk.groups:
            images = inputs["images"]
            for start in range(0, len(images), bucket):
                engine.run(KEY, {"images": images[start:start + bucket]})
    running = time.perf_counter() - started
    return rows / decoding, rows / (decoding + running)


def score_rate(app, round_: int, chunk_rows: int) -> float:
    from runtime.scoring import score_object

    started = time.perf_counter()
    result = asyncio.run(score_object(app, f"s3://{BUCKET}/rows.jsonl", f"s3://{BUCKET}/results/{round_}",
                                      model=MODEL, chunk_rows=chunk_rows))
    elapsed = time.perf_counter() - started
    assert not result.skipped and result.errors == 0, result
    return result.rows / elapsed


def stage(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, places in STAGES:
            if any(place in frame for place in places):
                return name
    return "other"


def profile_scoring(app, chunk_rows: int, seconds: float, raw: Path) -> dict:
    """py-spy's samples of this process while score_object runs (again and again) for `seconds`."""
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        return {"skipped": "py-spy is not installed"}
    raw.parent.mkdir(parents=True, exist_ok=True)
    recorder = subprocess.Popen([py_spy, "record", "--pid", str(os.getpid()), "--duration", str(round(seconds)),
                                 "--rate", str(SAMPLES_PER_SECOND), "--nonblocking", "--format", "raw",
                                 "--output", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1)
    round_ = 1000
    while recorder.poll() is None:
        round_ += 1
        score_rate(app, round_, chunk_rows)
    _, error = recorder.communicate()
    if recorder.returncode != 0:
        return {"skipped": f"py-spy failed: {error.strip()}"}
    own, stages, waiting = read_py_spy(raw, WAITS, stage)
    working = sum(own.values())
    return {"seconds": seconds, "samples": working + waiting, "raw": str(raw),
            "waiting_samples_left_out_percent": 100 * waiting / max(1, working + waiting),
            "stages_percent_of_working_samples": {name: 100 * n / working for name, n in stages.most_common()},
            "top_frames_percent": {name: 100 * n / working for name, n in own.most_common(15)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--chunk-rows", type=int, default=256)
    parser.add_argument("--profile-seconds", type=float, default=10, help="0: no profile")
    parser.add_argument("--out", type=Path, default=ROOT / "load" / "results")
    args = parser.parse_args()
    import orjson

    work = Path(tempfile.mkdtemp(prefix="kiln-scoring-"))
    servable = example_servables(work / "built", [MODEL])[MODEL].servable
    shutil.copytree(servable, work / "models" / MODEL / "1")
    x = digits_rows(args.rows)
    data = b"".join(orjson.dumps(row.tolist()) + b"\n" for row in x)
    with moto_server():
        import boto3

        from runtime.app import App
        from runtime.settings import Settings

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        boto3.client("s3").put_object(Bucket=BUCKET, Key="rows.jsonl", Body=data)
        app = App.start(Settings.from_env({}, batching_mode="fixed", overrides={
            "model_repository": str(work / "models"), "poll_seconds": 0}))
        try:
            with app.repository.hold(MODEL) as handle:
                engine, signature = handle.engine, handle.engine.signature(KEY)
                buckets = {b: engine_rate(engine, x[:4096], b) for b in handle.engine.manifest.batch_sizes}
                best = max(buckets, key=buckets.get)
                callers = len(os.sched_getaffinity(0))  # as many batches at once as the batcher runs
                measured: dict[str, list[float]] = {"engine": [], "engine_parallel": [], "score_object": [],
                                                    "decode": [], "decode_then_engine": []}
                # Round 0 warms everything up (connections, the batcher's learning) and is not counted.
                for round_ in range(args.rounds + 1):
                    order = ("engine", "score", "decode") if round_ % 2 else ("score", "decode", "engine")
                    rates = {}
                    for who in order:
                        if who == "engine":
                            rates["engine"] = engine_rate(engine, x, best)
                            rates["engine_parallel"] = engine_rate(engine, x, best, callers)
                        elif who == "score":
                            rates["score_object"] = score_rate(app, round_, args.chunk_rows)
                        else:
                            rates["decode"], rates["decode_then_engine"] = decode_then_engine(
                                engine, data, signature, args.chunk_rows, best)
                    if round_:
                        for name, rate in rates.items():
                            measured[name].append(rate)
                    print(f"round {round_}: " + ", ".join(f"{k} {v:,.0f} rows/s" for k, v in rates.items()),
                          file=sys.stderr)
                profile = (profile_scoring(app, args.chunk_rows, args.profile_seconds,
                                           args.out / "scoring_throughput_profile.txt")
                           if args.profile_seconds > 0 else {"skipped": "--profile-seconds 0"})
        finally:
            app.repository.stop()
    median = {name: statistics.median(rates) for name, rates in measured.items()}
    per_round = lambda a, b: statistics.median(x / y for x, y in zip(measured[a], measured[b]))  # noqa: E731
    results = {
        "model": MODEL, "rows": args.rows, "object_bytes": len(data), "bytes_per_row": len(data) / args.rows,
        "chunk_rows": args.chunk_rows, "rounds": args.rounds, "cpus": len(os.sched_getaffinity(0)),
        "engine_best_bucket": best, "engine_rows_per_second_by_bucket_warmup": buckets,
        "rows_per_second_median": median, "rows_per_second_rounds": measured,
        # Each ratio is the median over rounds of the ratio within a round (measured side by side,
        # so that a busy moment of a shared machine weighs on both sides of it).
        "ratio_score_object_to_engine": per_round("score_object", "engine"),
        "ratio_score_object_to_engine_parallel": per_round("score_object", "engine_parallel"),
        "ratio_score_object_to_decode_then_engine": per_round("score_object", "decode_then_engine"),
        "ratio_decode_then_engine_to_engine": per_round("decode_then_engine", "engine"),
        "target_ratio_score_object_to_engine": 0.9,
        "profile": profile,
    }
    path = write_results("scoring_throughput", results, args.out)
    plot(results, path.with_suffix(".png"))
    shutil.rmtree(work, ignore_errors=True)


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    profile = results["profile"].get("stages_percent_of_working_samples")
    fig, axes = plt.subplots(1, 2 if profile else 1, figsize=(13 if profile else 7, 4.5), squeeze=False)
    axes = axes.ravel()
    labels = {"engine": "engine\n(decoded rows)", "engine_parallel": f"engine,\n{results['cpus']} callers",
              "decode_then_engine": "decode, then\nengine", "score_object": "score_object\n(S3 in and out)",
              "decode": "decode\nalone"}
    names = list(labels)
    rates = results["rows_per_second_rounds"]
    medians = [statistics.median(rates[name]) for name in names]
    axes[0].bar([labels[name] for name in names], medians,
                yerr=[[m - min(rates[n]) for n, m in zip(names, medians)],
                      [max(rates[n]) - m for n, m in zip(names, medians)]], capsize=4,
                color=["tab:blue", "tab:cyan", "tab:gray", "tab:orange", "tab:green"])
    axes[0].set_ylabel("rows per second (median, min-max)")
    axes[0].set_title(f"{results['model']}: {results['rows']:,} JSON rows of {results['bytes_per_row']:,.0f} B, "
                      f"{results['cpus']} CPUs\nscore_object / engine = {results['ratio_score_object_to_engine']:.2f}x, "
                      f"/ (decode, then engine) = {results['ratio_score_object_to_decode_then_engine']:.2f}x")
    axes[0].tick_params(axis="x", labelsize=8)
    if profile:
        stages = list(reversed(list(profile)))
        axes[1].barh(stages, [profile[s] for s in stages])
        axes[1].set_xlabel("% of working samples in this process (py-spy, all threads)")
        axes[1].set_title("score_object: where the time goes")
        axes[1].tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
