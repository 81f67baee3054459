"""Continuous batching of tiny_lm's decode steps (runtime.sessions.decode_loop): sessions generating at the same
time share steps, yet each gets exactly the tokens it gets alone; sessions join and leave between
steps; one that is cancelled leaves the others running; more sessions than the largest bucket wait
for a seat; a session that fills its cache fails alone. Sessions are kept in process here
(tests/test_generate.py runs them in a real redis-server)."""

from __future__ import annotations

import asyncio
import gc
import shutil

import numpy as np
import orjson
import pytest

from runtime.sessions import decode_loop as decoding
from runtime.app import App
from runtime.exchange import Request
from runtime.batching import BatchingParameters
from runtime.sessions.generate import SHORT_CHUNK
from runtime.sessions.services import Sessions
from runtime.model_config import ModelConfig, ModelConfigList
from runtime.repository import Repository
from runtime.runner import Runner
from runtime.servable_cache import ServableCache

PROMPTS = ["Kiln ", "fires a SavedModel ", "into machine code, ", "once: ", "ünïcödé ✓ ", "a", "serving " * 15]


@pytest.fixture(scope="module")
def app(examples, tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    shutil.copytree(examples["tiny_lm"].servable, root / "tiny_lm" / "1")
    repository = Repository(ModelConfigList(models=(ModelConfig(name="tiny_lm", base_path=str(root / "tiny_lm")),)),
                            poll_seconds=0, cache=ServableCache(root / ".cache"))
    repository.start()
    parameters = BatchingParameters(mode="fixed", batch_timeout_micros=0)
    mp = pytest.MonkeyPatch()
    mp.setenv("KILN_SESSION_KEY", "22" * 32)
    yield App(repository, batching=lambda name: parameters, sessions=Sessions())
    mp.undo()
    repository.stop()


@pytest.fixture(scope="module")
def run():
    """One event loop for the module's app (its batcher and store belong to the loop they start in)."""
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.close()


def seated(app) -> int:
    return sum(len(loop.seats) for loop in app.sessions._decoders.values())


async def generate(app, body: dict) -> dict:
    response = await app.respond(Request("POST", "/v1/models/tiny_lm:generate", {}, orjson.dumps(body)))
    assert response.status == 200, response.body
    return orjson.loads(response.body)


def decode_steps(app) -> tuple[int, float]:
    """How many decode steps ran so far, and how many rows they ran over (bucket sizes summed)."""
    count = total = 0.0
    for metric in app.metrics.registry.collect():
        for sample in metric.samples:
            if sample.labels.get("signature") == "decode" and sample.name.endswith("batch_size_count"):
                count += sample.value
            if sample.labels.get("signature") == "decode" and sample.name.endswith("batch_size_sum"):
                total += sample.value
    return int(count), total


def test_sessions_share_steps_and_each_gets_what_it_gets_alone(app, run):
    bodies = [{"prompt": f"{prompt:<{SHORT_CHUNK}}", "max_tokens": 12, "temperature": 0.8 if i % 2 else 0, "seed": i}
              for i, prompt in enumerate(PROMPTS)]  # prompts of a prefill chunk each

    async def alone():
        return [await generate(app, body) for body in bodies]

    async def together():
        return await asyncio.gather(*(generate(app, body) for body in bodies))

    steps_before, _ = decode_steps(app)
    expected = run(alone())
    steps_alone, rows_alone = decode_steps(app)
    got = run(together())
    steps_together, rows = decode_steps(app)
    assert steps_alone - steps_before == 12 * len(bodies)
    # The prompts fit one prefill chunk, so the sessions sit down within a step of one another.
    assert steps_together - steps_alone <= 12 + 2, "the sessions' decode steps did not run together"
    assert rows - rows_alone == 12 * len(bodies)  # every token decoded once, whatever the step
    for want, have in zip(expected, got):
        assert have["tokens"] == want["tokens"] and have["text"] == want["text"]
        np.testing.assert_allclose(have["logprobs"], want["logprobs"], rtol=0, atol=1e-4)


def test_a_few_new_tokens_go_through_decode_steps(app, run):
    """Fewer than SHORT_CHUNK tokens of prompt are decoded one by one rather than prefilled as a
    chunk 128 wide: a continued session's few new tokens cost a few decode steps."""
    first = run(generate(app, {"prompt": "Kiln fires a SavedModel", "max_tokens": 2}))
    steps, _ = decode_steps(app)
    prefills = prefill_calls(app)
    continued = run(generate(app, {"prompt": "ok", "max_tokens": 3, "session": first["session"]}))
    assert decode_steps(app)[0] - steps == 2 + 3 and prefill_calls(app) == prefills
    whole = run(generate(app, {"tokens": list(b"Kiln fires a SavedModel") + first["tokens"] + list(b"ok"),
                               "max_tokens": 3}))
    assert continued["tokens"] == whole["tokens"]


def prefill_calls(app) -> int:
    return sum(sample.value for metric in app.metrics.registry.collect() for sample in metric.samples
               if sample.labels.get("signature") == "prefill" and sample.name.endswith("batch_size_count"))


def test_a_session_joins_between_the_steps_of_another(app, run):
    async def joining():
        first = asyncio.create_task(generate(app, {"prompt": "a long one ", "max_tokens": 40}))
        while not seated(app):  # the first is decoding
            await asyncio.sleep(0.001)
        second = await generate(app, {"prompt": "joins ", "max_tokens": 5})
        return await first, second

    first, second = run(joining())
    assert first["tokens"] == run(generate(app, {"prompt": "a long one ", "max_tokens": 40}))["tokens"]
    assert second["tokens"] == run(generate(app, {"prompt": "joins ", "max_tokens": 5}))["tokens"]


def test_a_cancelled_session_leaves_and_the_others_go_on(app, run):
    async def both():
        doomed = asyncio.create_task(generate(app, {"prompt": "doomed ", "max_tokens": 200}))
        kept = asyncio.create_task(generate(app, {"prompt": "kept ", "max_tokens": 30}))
        await asyncio.sleep(0.05)
        doomed.cancel()
        result = await kept
        with pytest.raises(asyncio.CancelledError):
            await doomed
        return result

    kept = run(both())
    assert not seated(app)
    assert kept["tokens"] == run(generate(app, {"prompt": "kept ", "max_tokens": 30}))["tokens"]


def test_more_sessions_than_seats_wait_for_one(app, run, monkeypatch):
    """With seats for two (the buckets 1 and 2 only), five sessions all finish, never more than two
    rows a step, each with its own tokens."""
    original = decoding.DecodeLoop.__init__
    widest = []

    def two_seats(self, *args):
        original(self, *args)
        self.buckets = (1, 2)

    observe = Runner.observe

    def watch(self, handle, key, rows, seconds):
        if key == "decode":
            widest.append(rows)
        observe(self, handle, key, rows, seconds)

    bodies = [{"prompt": prompt, "max_tokens": 6} for prompt in PROMPTS[:5]]
    expected = [run(generate(app, body))["tokens"] for body in bodies]
    gc.collect()  # a loop left in a reference cycle (a cancelled session's traceback) goes now
    assert not app.sessions._decoders, "a decode loop outlived its sessions"
    monkeypatch.setattr(decoding.DecodeLoop, "__init__", two_seats)
    monkeypatch.setattr(Runner, "observe", watch)

    async def together():
        return await asyncio.gather(*(generate(app, body) for body in bodies))

    got = run(together())
    assert [answer["tokens"] for answer in got] == expected
    assert widest and max(widest) == 2


def test_a_session_that_fills_its_cache_fails_alone(app, run, examples):
    from examples.tiny_lm import CONTEXT

    async def both():
        full = app.respond(Request("POST", "/v1/models/tiny_lm:generate", {},
                                  orjson.dumps({"tokens": [65] * (CONTEXT - 1), "max_tokens": 3})))
        return await asyncio.gather(full, generate(app, {"prompt": "fine ", "max_tokens": 8}))

    full, fine = run(both())
    assert full.status == 400 and f"at most {CONTEXT} tokens" in orjson.loads(full.body)["error"]
    assert fine["tokens"] == run(generate(app, {"prompt": "fine ", "max_tokens": 8}))["tokens"]


def test_a_seat_holds_exactly_its_sessions_state(app, run):
    """A row's cache past what its session holds is zeros, whoever sat there before; a session that
    leaves takes exactly the filled part, and the last seat moving into a freed one keeps its state."""
    from runtime.sessions.state import initial_state, untrim_state

    def full(loop, stored):
        state = initial_state(loop.signatures["decode"], 1)
        untrim_state(loop.signatures, stored, state)
        return state

    async def scenario():
        with app.repository.hold("tiny_lm") as handle:
            loop = decoding.DecodeLoop(handle, lambda *args: None)
            long = await loop.join(None)
            for start in range(0, 300, 128):
                chunk = np.zeros((1, 128), np.int32)
                chunk[0, :min(128, 300 - start)] = 65
                await loop.run(long, "prefill", {"tokens": chunk, "count": np.array([min(128, 300 - start)], np.int32)})
            kept = await loop.leave(long)
            assert kept["kv_cache"].shape[4] == 300 and kept["position"].tolist() == [300]
            short = await loop.join(None)  # row 0 again: the long session's cache must be gone
            assert short.row == 0 and not loop.pool["kv_cache"][0].any() and loop.pool["position"][0] == 0
            await loop.run(short, "decode", {"token": np.array([66], np.int32)})
            other = await loop.join(kept)
            np.testing.assert_array_equal(loop.pool["kv_cache"][1], full(loop, kept)["kv_cache"][0])
            before = loop.pool["kv_cache"][1].copy()
            await loop.leave(short)  # `other` moves from row 1 into row 0
            assert other.row == 0
            np.testing.assert_array_equal(loop.pool["kv_cache"][0], before)
            again = await loop.join(None)  # into row 1, which held `other` before it moved
            assert again.row == 1 and not loop.pool["kv_cache"][1].any()
            taken = await loop.leave(other)
            for name in kept:
                np.testing.assert_array_equal(taken[name], kept[name])
            await loop.leave(again)

    run(scenario())


def test_a_generation_past_its_deadline_ends_and_stores_nothing(app, run):
    """X-Kiln-Timeout-Ms bounds the whole generation: past it the request answers 504 (a stream
    ends with that error), leaves its seat, and its session is not stored; others go on."""
    from runtime.errors import SessionNotFound

    def late(stream: bool):
        return app.respond(Request("POST", "/v1/models/tiny_lm:generate", {"x-kiln-timeout-ms": "30"},
                                  orjson.dumps({"prompt": "slow and long ", "max_tokens": 4000, "stream": stream})))

    response = run(late(False))
    assert response.status == 504 and "deadline passed while it was generating" in orjson.loads(response.body)["error"]

    async def streamed():
        response = await late(True)
        return response.headers["X-Kiln-Session"], [event async for event in response.stream]

    session, events = run(streamed())
    assert events[-1].startswith(b"event: error") and b'"status":504' in events[-1]
    assert not seated(app)
    with app.repository.hold("tiny_lm") as handle, pytest.raises(SessionNotFound):
        run(app.sessions.store().load("default", session, app.sessions.fingerprint(handle)))
    assert run(generate(app, {"prompt": "after ", "max_tokens": 3}))["tokens"]
