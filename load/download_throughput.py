"""Download throughput: ServableCache.fetch of a servable from an S3-compatible store into an empty
cache (download, then size and sha256 of every file) against boto3's own download_file of the same
objects, one after another with its default TransferConfig; interleaved rounds after an uncounted
warm-up round, median MB/s and their ratio.

The store is moto's standalone server on loopback, in its own process so that it does not share
this one's interpreter lock.

    python load/download_throughput.py [--rounds 10] [--model mobilenet_v2] [--out load/results]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import ROOT, example_servables, moto_server, pyplot, write_results

BUCKET = "kiln-benchmark"


def fetch_with_cache(storage, name: str, work: Path) -> float:
    from runtime.servable_cache import ServableCache

    cache = ServableCache(work / "cache")
    started = time.perf_counter()
    fetched = cache.fetch(storage, name, 1)
    elapsed = time.perf_counter() - started
    assert fetched.verified
    return elapsed


def download_raw(client, keys: list[str], work: Path) -> float:
    """boto3's download_file of every object, one after another, as a script would do it."""
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig()
    started = time.perf_counter()
    for key in keys:
        dest = work / "raw" / key
        dest.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(BUCKET, key, str(dest), Config=config)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--model", default="mobilenet_v2", help="the example servable to download")
    parser.add_argument("--out", type=Path, default=ROOT / "load" / "results")
    args = parser.parse_args()
    source = example_servables(Path(tempfile.mkdtemp(prefix="kiln-download-")), [args.model])[args.model].servable
    files = sorted(p for p in source.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    with moto_server():
        import boto3

        from runtime.storage import open_storage

        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        keys = [f"{args.model}/1/{p.relative_to(source)}" for p in files]
        for path, key in zip(files, keys):
            client.upload_file(str(path), BUCKET, key)
        storage = open_storage(f"s3://{BUCKET}")
        kiln, raw = [], []
        # Round 0 warms both clients up (endpoint rules, connections, threads) and is not counted;
        # then the rounds interleave, alternating who goes first.
        for round_ in range(args.rounds + 1):
            for who in (("kiln", "raw") if round_ % 2 == 0 else ("raw", "kiln")):
                work = Path(tempfile.mkdtemp(prefix="kiln-download-round-"))
                try:
                    if who == "kiln":
                        kiln.append(fetch_with_cache(storage, args.model, work))
                    else:
                        raw.append(download_raw(client, keys, work))
                finally:
                    shutil.rmtree(work)
        kiln, raw = kiln[1:], raw[1:]
    results = {
        "model": args.model, "files": len(files), "megabytes": total / 1e6, "rounds": args.rounds,
        "kiln_fetch_seconds": kiln, "boto3_download_file_seconds": raw,
        "kiln_fetch_mb_per_s": total / 1e6 / statistics.median(kiln),
        "boto3_download_file_mb_per_s": total / 1e6 / statistics.median(raw),
    }
    results["ratio"] = results["kiln_fetch_mb_per_s"] / results["boto3_download_file_mb_per_s"]
    write_results("download_throughput", results, args.out)
    plot(results, args.out / "download_throughput.png")


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = ["Kiln fetch\n(download + verify)", "boto3 download_file"]
    keys = ["kiln_fetch_seconds", "boto3_download_file_seconds"]
    ax.bar(labels, [results["kiln_fetch_mb_per_s"], results["boto3_download_file_mb_per_s"]], 0.5)
    for x, key in enumerate(keys):
        ax.scatter([x] * len(results[key]), [results["megabytes"] / s for s in results[key]], color="black", s=10)
    ax.set_ylabel("MB/s (bars: median; dots: rounds)")
    ax.set_title(f"{results['model']}, {results['megabytes']:.0f} MB from moto S3 on loopback: "
                 f"ratio {results['ratio']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
