"""Publish to serve: the time from a new version's upload to an S3-compatible store (its manifest,
written last, lands) to the first prediction served by that version, through Kiln's repository:
poll, download, verification, library load, warm-up of every bucket, then the swap.

    python load/publish_to_serve.py [--models digits,mobilenet_v2] [--versions 4] [--poll-seconds 1,0.1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import ROOT, example_servables, moto_server, pyplot, write_results

BUCKET = "kiln-publish"


def upload(client, servable: Path, prefix: str) -> float:
    """Every file, then manifest.json; returns when the manifest's PUT is done (publication)."""
    files = sorted(p for p in servable.rglob("*") if p.is_file() and p.name != "manifest.json")
    for path in files:
        client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(servable)}")
    client.upload_file(str(servable / "manifest.json"), BUCKET, f"{prefix}/manifest.json")
    return time.perf_counter()


def first_prediction_from(repo, name: str, version: int, inputs: dict, timeout: float = 300) -> float:
    """When a request, retried as a client would, is first answered by `version`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with repo.hold(name) as handle:
            if handle.version == version:
                handle.engine.run("serving_default", inputs)
                return time.perf_counter()
        time.sleep(0.002)
    raise TimeoutError(f"{name} version {version} did not serve within {timeout} s")


def measure(client, example, versions: int, poll_seconds: float) -> list[float]:
    import numpy as np

    from runtime.model_config import ModelConfig, ModelConfigList
    from runtime.repository import Repository
    from runtime.servable_cache import ServableCache

    prefix = f"{example.name}-{poll_seconds}"
    upload(client, example.servable, f"{prefix}/1")
    config = ModelConfigList(models=(ModelConfig(name=example.name, base_path=f"s3://{BUCKET}/{prefix}"),))
    with tempfile.TemporaryDirectory(prefix="kiln-publish-cache-") as cache:
        repo = Repository(config, poll_seconds=poll_seconds, cache=ServableCache(Path(cache)))
        repo.start()
        try:
            with repo.hold(example.name) as handle:
                spec = handle.engine.signature("serving_default").inputs[0]
            inputs = {spec.name: np.zeros((1, *spec.shape[1:]), spec.dtype)}
            seconds = []
            for version in range(2, versions + 2):
                published = upload(client, example.servable, f"{prefix}/{version}")
                seconds.append(first_prediction_from(repo, example.name, version, inputs) - published)
                print(example.name, f"poll {poll_seconds} s", f"version {version}", f"{seconds[-1]:.3f} s", flush=True)
        finally:
            repo.stop()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,mobilenet_v2")
    parser.add_argument("--versions", type=int, default=4)
    parser.add_argument("--poll-seconds", default="1,0.1")
    parser.add_argument("--out", type=Path, default=ROOT / "load" / "results")
    args = parser.parse_args()
    examples = example_servables(Path(tempfile.mkdtemp(prefix="kiln-publish-")), args.models.split(","))
    polls = [float(p) for p in args.poll_seconds.split(",")]
    results = {"versions": args.versions, "models": {}}
    with moto_server():
        import boto3

        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        for name, example in examples.items():
            size = sum(p.stat().st_size for p in example.servable.rglob("*") if p.is_file())
            results["models"][name] = {"megabytes": size / 1e6, "poll_seconds": {}}
            for poll in polls:
                seconds = measure(client, example, args.versions, poll)
                results["models"][name]["poll_seconds"][str(poll)] = {
                    "median_seconds": statistics.median(seconds), "max_seconds": max(seconds), "all": seconds}
    write_results("publish_to_serve", results, args.out)
    plot(results, args.out / "publish_to_serve.png")


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(results["models"])
    polls = list(next(iter(results["models"].values()))["poll_seconds"])
    width = 0.8 / len(polls)
    for i, poll in enumerate(polls):
        ax.bar([x + i * width for x in range(len(names))],
               [results["models"][n]["poll_seconds"][poll]["median_seconds"] for n in names], width,
               label=f"poll every {poll} s")
    ax.set_xticks([x + width * (len(polls) - 1) / 2 for x in range(len(names))], names)
    ax.set_ylabel("upload to first served prediction (s, median)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
