"""Session store throughput: saving and loading agent state through Kiln's RedisStore against raw
redis-py SET/GET of the same bytes, and redis-benchmark's own, on a redis-server on loopback.

Why: the store adds a header, a checksum over every byte, a manifest, a compare-and-set script and
removal of the replaced version to what is, underneath, a pipeline of SETs and GETs; this says what
that costs for states of 1, 8 and 64 MiB (a K/V cache as two float32 tensors, k and v, of half the
size each, with a token history of 1000 tokens).

What is timed, all in this process on one event loop (uvloop when installed, as `kiln serve` runs):
  kiln_save   RedisStore.save of the state over the previous version (write the chunks, the
              compare-and-set, removal of the replaced chunks), chunks of KILN_SESSION_CHUNK_BYTES;
  kiln_load   RedisStore.load (manifest and history, then every chunk with the expiry extended;
              checks and decoding into new arrays);
  raw_set     the same chunks of the same arrays, one pipeline of SET key value PX ttl through
              redis-py's asyncio client, the same client library Kiln uses;
  raw_get     one pipeline of GET for those keys;
  memory_*    MemoryStore, for what the format alone costs.
MB/s is the state's bytes (10^6) per second for one operation; a round trip is a save and a load.
Each figure is the median over rounds that interleave Kiln and raw, alternating who goes first.
redis-benchmark (C, pipelined 16 deep, one connection) SETs and GETs values of the chunk size, for
what the server and loopback manage without Python at all.

    python load/session_store.py [--sizes-mib 1,8,64] [--rounds 15] [--chunk-bytes 4194304]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, pyplot, write_results

from runtime.sessions import MemoryStore, RedisStore
from runtime.sessions.encoding import encode
from tests.redis_server import RedisServer

TENANT, FINGERPRINT, TTL_MS = "bench", "agent/1/bench", 600_000
OPERATIONS = ("kiln_save", "kiln_load", "raw_set", "raw_get", "memory_save", "memory_load")


def make_state(size: int) -> dict[str, np.ndarray]:
    half = size // 8  # float32 elements in half of `size` bytes
    rng = np.random.default_rng(size)
    return {"k": rng.standard_normal(half, dtype=np.float32), "v": rng.standard_normal(half, dtype=np.float32)}


async def measure(url: str, size: int, rounds: int, chunk_bytes: int) -> dict[str, list[float]]:
    import redis.asyncio as aioredis

    tensors, history = make_state(size), list(range(1000))
    chunks = [chunk for name, array in tensors.items() for chunk in encode(name, array, "", chunk_bytes).chunks]
    raw_keys = [f"raw:{size}:{i}" for i in range(len(chunks))]
    kiln, memory, raw = RedisStore(url, chunk_bytes=chunk_bytes), MemoryStore(chunk_bytes=chunk_bytes), \
        aioredis.Redis.from_url(url)
    times: dict[str, list[float]] = {name: [] for name in OPERATIONS}
    versions = {"kiln": 0, "memory": 0}
    session = f"bench-{size}"

    async def timed(name: str, call) -> None:
        started = time.perf_counter()
        await call()
        times[name].append(time.perf_counter() - started)

    async def store_round(prefix: str, store) -> None:
        async def save():
            versions[prefix] = await store.save(TENANT, session, versions[prefix], tensors, history, FINGERPRINT)

        async def load():
            loaded = await store.load(TENANT, session, FINGERPRINT)
            assert loaded.tensors["v"].nbytes == tensors["v"].nbytes

        await timed(f"{prefix}_save", save)
        await timed(f"{prefix}_load", load)

    async def raw_round() -> None:
        async def set_all():
            async with raw.pipeline(transaction=False) as pipe:
                for key, chunk in zip(raw_keys, chunks):
                    pipe.set(key, chunk, px=TTL_MS)
                await pipe.execute()

        async def get_all():
            async with raw.pipeline(transaction=False) as pipe:
                for key in raw_keys:
                    pipe.get(key)
                values = await pipe.execute()
            assert sum(map(len, values)) == sum(map(len, chunks))

        await timed("raw_set", set_all)
        await timed("raw_get", get_all)

    for round_ in range(rounds + 1):  # round 0 warms up connections and scripts, and is dropped
        order = [lambda: store_round("kiln", kiln), raw_round]
        for step in order if round_ % 2 == 0 else order[::-1]:
            await step()
        await store_round("memory", memory)
    await kiln.delete(TENANT, session)
    await raw.delete(*raw_keys)
    for client in (kiln, memory):
        await client.close()
    await raw.aclose()
    return {name: values[1:] for name, values in times.items()}


def redis_benchmark(port: int, value_bytes: int, total_bytes: int) -> dict[str, float] | None:
    """redis-benchmark's SET and GET MB/s for values of `value_bytes`; None when it is not installed."""
    if shutil.which("redis-benchmark") is None:
        return None
    requests = max(64, total_bytes // value_bytes)
    output = subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "set,get", "-d",
                             str(value_bytes), "-n", str(requests), "-c", "1", "-P", "16", "--csv"],
                            capture_output=True, text=True, check=True).stdout
    rows = {row["test"]: float(row["rps"]) for row in csv.DictReader(io.StringIO(output))}
    return {f"{test.lower()}_mb_per_s": rps * value_bytes / 1e6 for test, rps in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", default="1,8,64")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--chunk-bytes", type=int, default=4 << 20)
    parser.add_argument("--out", type=Path, default=ROOT / "load" / "results")
    args = parser.parse_args()
    try:
        import uvloop

        runner, loop_name = uvloop.run, "uvloop"
    except ImportError:
        runner, loop_name = asyncio.run, "asyncio"
    from redis.utils import HIREDIS_AVAILABLE

    parser_name = "hiredis" if HIREDIS_AVAILABLE else "redis-py's Python parser"
    results = {"chunk_bytes": args.chunk_bytes, "rounds": args.rounds, "event_loop": loop_name,
               "redis_parser": parser_name, "sizes": []}
    with tempfile.TemporaryDirectory(prefix="kiln-redis-bench-") as directory, RedisServer(Path(directory)) as server:
        results["server"] = subprocess.run([server.binary, "--version"], capture_output=True, text=True).stdout.strip()
        for mib in (int(part) for part in args.sizes_mib.split(",")):
            size = mib << 20
            times = runner(measure(server.url, size, args.rounds, args.chunk_bytes))
            entry = {"mib": mib, "seconds": times}
            for name, values in times.items():
                entry[f"{name}_mb_per_s"] = size / 1e6 / statistics.median(values)
            for prefix in ("kiln", "raw", "memory"):
                write, read = ("set", "get") if prefix == "raw" else ("save", "load")
                entry[f"{prefix}_round_trip_mb_per_s"] = 2 * size / 1e6 / (
                    statistics.median(times[f"{prefix}_{write}"]) + statistics.median(times[f"{prefix}_{read}"]))
            entry["ratio_save_to_set"] = entry["kiln_save_mb_per_s"] / entry["raw_set_mb_per_s"]
            entry["ratio_load_to_get"] = entry["kiln_load_mb_per_s"] / entry["raw_get_mb_per_s"]
            entry["ratio_round_trip"] = entry["kiln_round_trip_mb_per_s"] / entry["raw_round_trip_mb_per_s"]
            entry["redis_benchmark"] = redis_benchmark(server.port, min(args.chunk_bytes, size), 4 * size)
            results["sizes"].append(entry)
            print(f"{mib} MiB: kiln {entry['kiln_round_trip_mb_per_s']:.0f} MB/s, raw "
                  f"{entry['raw_round_trip_mb_per_s']:.0f} MB/s, ratio {entry['ratio_round_trip']:.2f}", flush=True)
    write_results("session_store", results, args.out)
    plot(results, args.out / "session_store.png")


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    series = [("kiln_save", "Kiln save"), ("raw_set", "raw SET"), ("kiln_load", "Kiln load"), ("raw_get", "raw GET"),
              ("memory_save", "MemoryStore save"), ("memory_load", "MemoryStore load")]
    sizes = results["sizes"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(series)
    for i, (key, label) in enumerate(series):
        ax.bar([x + i * width for x in range(len(sizes))], [entry[f"{key}_mb_per_s"] for entry in sizes], width,
               label=label)
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(sizes))],
                  [f"{entry['mib']} MiB\nround trip ratio {entry['ratio_round_trip']:.2f}" for entry in sizes])
    ax.set_yscale("log")
    ax.set_ylabel("MB/s (median)")
    ax.set_title(f"Session state through RedisStore vs raw redis-py pipelines ({results['event_loop']}, "
                 f"{results['chunk_bytes'] >> 20} MiB chunks)")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
