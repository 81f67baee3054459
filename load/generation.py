"""Agent sessions on tiny_lm, through the core (App.respond, the batcher, sessions in a real
redis-server started here):

  resume      continuing a session whose context is C tokens (its state loaded from Redis) against
              re-prefilling the whole context in a fresh session, for C = 128, 512, 2048; both then
              generate one token, streamed. Timed to that token (what the client waits for) and to
              the end of the answer (after the session's state, 2 MiB at 2048, is stored again).
              Target: at least 5x faster at 2048.
  decode      tokens per second with 1, 8 and 32 sessions generating at once: continuous batching
              (concurrent requests, whose prefill chunks and decode steps the decode loop runs as
              one batch) against one session at a time (the same requests one after another), for
              replies of 16 and of 128 tokens. Whole requests are timed: each also prefills its
              prompt and stores its session. Target: at least 4x at 32.

Rounds interleave the compared runs; medians are reported as JSON and drawn as a PNG.

    python load/generation.py [--rounds 3] [--lengths 16,128]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import example_servables, free_ports, pyplot, write_results


def start_redis(directory: Path) -> tuple[subprocess.Popen, str]:
    import redis

    (port,) = free_ports(1)
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(directory)], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 20
    while True:
        try:
            if redis.Redis.from_url(url).ping():
                return server, url
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def open_app(models: Path, redis_url: str):
    from runtime.app import App
    from runtime.batching import BatchingParameters
    from runtime.sessions.services import Sessions
    from runtime.model_config import ModelConfig, ModelConfigList
    from runtime.repository import Repository
    from runtime.servable_cache import ServableCache

    repository = Repository(ModelConfigList(models=(ModelConfig(name="tiny_lm", base_path=str(models / "tiny_lm")),)),
                            poll_seconds=0, cache=ServableCache(models / ".cache"))
    repository.start()
    parameters = BatchingParameters(mode="fixed", batch_timeout_micros=0)
    return App(repository, batching=lambda name: parameters, sessions=Sessions(redis_url))


async def generate(app, body: dict) -> dict:
    import orjson

    from runtime.exchange import Request

    response = await app.respond(Request("POST", "/v1/models/tiny_lm:generate", {}, orjson.dumps(body)))
    if response.status != 200:
        raise RuntimeError(f"generate answered {response.status}: {response.body[:300]!r}")
    return orjson.loads(response.body)


async def timed(work) -> float:
    started = time.perf_counter()
    await work
    return time.perf_counter() - started


async def streamed(app, body: dict) -> tuple[float, float]:
    """Seconds to a streamed generate request's first token, and to its end (its session stored)."""
    import orjson

    from runtime.exchange import Request

    started = time.perf_counter()
    response = await app.respond(Request("POST", "/v1/models/tiny_lm:generate", {},
                                        orjson.dumps({**body, "stream": True})))
    first = None
    async for event in response.stream:
        if first is None and event.startswith(b"data: ") and b'"token"' in event:
            first = time.perf_counter() - started
        if event.startswith(b"event: error"):
            raise RuntimeError(f"generate failed: {event!r}")
    return first, time.perf_counter() - started


async def resume(app, context: int, rounds: int) -> dict:
    """Seconds to the next token after `context` tokens, and to the whole answer (the session
    stored again): continuing the stored session, and re-prefilling the context in a new one."""
    text = bytes(65 + i % 26 for i in range(context - 2))  # + 1 new token + 1 generated = context
    resumed, refilled = [], []
    for _ in range(rounds):
        session = (await generate(app, {"tokens": list(text), "max_tokens": 0}))["session"]
        resumed.append(await streamed(app, {"tokens": [32], "max_tokens": 1, "session": session}))
        refilled.append(await streamed(app, {"tokens": list(text) + [32], "max_tokens": 1}))
    first = [statistics.median(times[0] for times in runs) for runs in (resumed, refilled)]
    whole = [statistics.median(times[1] for times in runs) for runs in (resumed, refilled)]
    return {"resume_first_token_seconds": first[0], "reprefill_first_token_seconds": first[1],
            "first_token_speedup": first[1] / first[0],
            "resume_seconds": whole[0], "reprefill_seconds": whole[1], "speedup": whole[1] / whole[0]}


async def decode(app, sessions: int, tokens: int, rounds: int) -> dict:
    """Generated tokens per second for `sessions` sessions, all at once and one after another."""
    bodies = [{"prompt": f"session {i} ", "max_tokens": tokens} for i in range(sessions)]
    together, alone = [], []
    for _ in range(rounds):
        together.append(sessions * tokens / await timed(asyncio.gather(*(generate(app, b) for b in bodies))))

        async def one_by_one():
            for body in bodies:
                await generate(app, body)

        alone.append(sessions * tokens / await timed(one_by_one()))
    return {"continuous_tokens_per_second": statistics.median(together),
            "one_at_a_time_tokens_per_second": statistics.median(alone),
            "speedup": statistics.median(together) / statistics.median(alone)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lengths", default="16,128", help="tokens each session generates in the decode runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-generation-"))
    os.environ.setdefault("KILN_SESSION_KEY", "11" * 32)
    example = example_servables(work / "built", ["tiny_lm"])["tiny_lm"]
    shutil.copytree(example.servable, work / "models" / "tiny_lm" / "1")
    redis_server, url = start_redis(work)
    try:
        app = open_app(work / "models", url)
        loop = asyncio.new_event_loop()
        results = {"model": "tiny_lm", "rounds": args.rounds, "cpus": os.cpu_count(),
                   "resume": {str(c): loop.run_until_complete(resume(app, c, args.rounds)) for c in (128, 512, 2048)},
                   "decode": {str(tokens): {str(n): loop.run_until_complete(decode(app, n, tokens, args.rounds))
                                            for n in (1, 8, 32)}
                              for tokens in map(int, args.lengths.split(","))}}
        at_2048 = results["resume"]["2048"]
        results["targets"] = {"resume_first_token_speedup_at_2048": at_2048["first_token_speedup"],
                              "resume_whole_answer_speedup_at_2048": at_2048["speedup"],
                              "resume_at_least_5x": at_2048["first_token_speedup"] >= 5,
                              **{f"continuous_batching_speedup_at_32_for_{tokens}_tokens": runs["32"]["speedup"]
                                 for tokens, runs in results["decode"].items()},
                              "continuous_batching_at_least_4x": all(runs["32"]["speedup"] >= 4
                                                                     for runs in results["decode"].values())}
        loop.run_until_complete(app.sessions.close())
        app.repository.stop()
    finally:
        redis_server.terminate()
        redis_server.wait()
    write_results("generation", results, args.out)
    plot(results, args.out / "generation.png")


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    figure, (resume_axes, decode_axes) = plt.subplots(1, 2, figsize=(10, 4))
    contexts = list(results["resume"])
    for key, label, style in (("resume_first_token_seconds", "resume, next token", "-"),
                              ("reprefill_first_token_seconds", "re-prefill, next token", "-"),
                              ("resume_seconds", "resume, whole answer", "--"),
                              ("reprefill_seconds", "re-prefill, whole answer", "--")):
        resume_axes.plot(contexts, [results["resume"][c][key] * 1e3 for c in contexts], marker="o", linestyle=style,
                         label=label)
    resume_axes.set(xlabel="context tokens", ylabel="ms", yscale="log")
    for tokens, runs in results["decode"].items():
        counts = list(runs)
        decode_axes.plot(counts, [runs[n]["continuous_tokens_per_second"] for n in counts], marker="o",
                         label=f"continuous batching, {tokens}-token replies")
        decode_axes.plot(counts, [runs[n]["one_at_a_time_tokens_per_second"] for n in counts], marker="o",
                         linestyle="--", label=f"one at a time, {tokens}-token replies")
    decode_axes.set(xlabel="sessions", ylabel="tokens/s")
    for axes in (resume_axes, decode_axes):
        axes.legend()
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
