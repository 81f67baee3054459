"""The micro-batcher over real servables (half_plus_two: y = x/2 + 2, easy to check per caller):
results routed to the right caller under concurrent load, merging into every bucket, a poisoned
request, a full queue, deadlines, cancellation, oversized requests, and each mode's timing."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time

import numpy as np
import pytest

from runtime.batcher import Batcher, _pad_to_largest
from runtime.batching import BatchingParameters
from runtime.errors import DeadlineExceeded, InvalidInput, ResourceExhausted
from runtime.metrics import Metrics
from runtime.model_config import ModelConfig, ModelConfigList
from runtime.repository import Repository
from runtime.runner import Runner
from runtime.servable_cache import ServableCache


@pytest.fixture(scope="module")
def models(examples, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(examples["half_plus_two"].servable, root / "half_plus_two" / "1")
    repository = Repository(ModelConfigList(models=(ModelConfig(name="half_plus_two",
                                                                base_path=str(root / "half_plus_two")),)),
                            poll_seconds=0, cache=ServableCache(root / ".cache"))
    repository.start()
    yield repository
    repository.stop()


class Recorder:
    """Wraps the engine's run: records every merged batch's x, can hold batches, can fail them."""

    def __init__(self, engine, monkeypatch):
        self.batches: list[np.ndarray] = []
        self.gate = threading.Event()
        self.gate.set()
        self.original = engine.run
        monkeypatch.setattr(engine, "run", self.run)

    def run(self, key, inputs):
        self.batches.append(np.array(inputs["x"]))
        self.gate.wait(30)
        if np.any(np.asarray(inputs["x"]) == 666):
            raise InvalidInput("poisoned value 666")
        return self.original(key, inputs)


@pytest.fixture
def served(models, monkeypatch):
    """(handle, recorder) for half_plus_two version 1, held for the test."""
    with models.hold("half_plus_two") as handle:
        yield handle, Recorder(handle.engine, monkeypatch)


def batcher_for(models, **parameters) -> Batcher:
    chosen = BatchingParameters(**parameters)
    batcher = Runner(models, Metrics(), lambda name: chosen).batcher
    assert batcher is not None
    return batcher


def test_concurrent_requests_each_get_their_own_rows(models, served):
    handle, recorder = served
    # Room for every row at once: this is about whose rows come back, not back-pressure (tested below),
    # and on a loaded machine 900 rows can outrun 10 batches' worth of queue while the engine thread waits.
    batcher = batcher_for(models, mode="fixed", batch_timeout_micros=2000, max_batch_size=32, max_enqueued_batches=40)
    rng = np.random.default_rng(0)
    requests = [rng.uniform(-100, 100, size=rng.integers(1, 6)).astype(np.float32) for _ in range(300)]

    async def main():
        async def one(x, delay):
            await asyncio.sleep(delay)
            return await batcher.run(handle, "serving_default", {"x": x}, None)

        return await asyncio.gather(*(one(x, rng.uniform(0, 0.05)) for x in requests))

    results = asyncio.run(main())
    for x, result in zip(requests, results):
        assert result["y"].shape == x.shape  # the bucket's padding is gone
        np.testing.assert_array_equal(result["y"], x / 2 + 2)
    assert len(recorder.batches) < len(requests) / 3  # requests were merged
    assert max(len(b) for b in recorder.batches) <= 32


def test_requests_of_one_step_merge_into_every_bucket(models, served):
    """What a Lambda event's records do: arrive together, and run as one batch without waiting."""
    handle, recorder = served
    batcher = batcher_for(models, mode="fixed", batch_timeout_micros=0, max_batch_size=32)
    sizes = handle.engine.manifest.batch_sizes

    async def step(count: int):
        return await asyncio.gather(*(batcher.run(handle, "serving_default", {"x": np.array([i], np.float32)}, None)
                                      for i in range(count)))

    for count in sizes:
        started = time.perf_counter()
        results = asyncio.run(step(count))
        assert [r["y"].tolist() for r in results] == [[i / 2 + 2] for i in range(count)]
        assert time.perf_counter() - started < 5
    assert [len(b) for b in recorder.batches] == list(sizes)


def test_a_poisoned_request_fails_alone(models, served):
    handle, recorder = served
    batcher = batcher_for(models, mode="fixed", batch_timeout_micros=0)

    async def main():
        calls = [batcher.run(handle, "serving_default", {"x": np.array(x, np.float32)}, None)
                 for x in ([1.0], [666.0, 2.0], [3.0])]
        calls.append(batcher.run(handle, "serving_default", {"x": np.array(["text"])}, None))  # wrong dtype
        return await asyncio.gather(*calls, return_exceptions=True)

    first, poisoned, third, wrong_dtype = asyncio.run(main())
    assert first["y"].tolist() == [2.5] and third["y"].tolist() == [3.5]
    assert isinstance(poisoned, InvalidInput) and "666" in str(poisoned)
    assert isinstance(wrong_dtype, InvalidInput) and "dtype" in str(wrong_dtype)
    assert len(recorder.batches[0]) == 4  # merged first, then rerun one by one
    assert [b.tolist() for b in recorder.batches[1:]] == [[1.0], [666.0, 2.0], [3.0]]


def test_a_full_queue_refuses_at_once(models, served):
    handle, recorder = served
    batcher = batcher_for(models, mode="fixed", max_batch_size=2, allowed_batch_sizes=(1, 2),
                          max_enqueued_batches=2, num_batch_threads=1)
    recorder.gate.clear()

    async def main():
        def call(x):
            return asyncio.ensure_future(batcher.run(handle, "serving_default", {"x": np.array(x, np.float32)}, None))

        running = call([1.0, 2.0])  # dispatched, held at the gate
        await asyncio.sleep(0.1)
        queued = [call([3.0, 4.0]), call([5.0, 6.0])]  # two batches' worth: the queue is full
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        with pytest.raises(ResourceExhausted, match="queue of model 'half_plus_two' is full"):
            await batcher.run(handle, "serving_default", {"x": np.array([7.0], np.float32)}, None)
        refused_in = time.perf_counter() - started
        recorder.gate.set()
        return refused_in, await running, await asyncio.gather(*queued)

    refused_in, running, queued = asyncio.run(main())
    assert refused_in < 0.05
    assert running["y"].tolist() == [2.5, 3.0] and [q["y"].tolist() for q in queued] == [[3.5, 4.0], [4.5, 5.0]]


def test_a_deadline_passing_in_the_queue_answers_at_once_and_skips_the_work(models, served):
    handle, recorder = served
    batcher = batcher_for(models, mode="fixed", num_batch_threads=1)
    recorder.gate.clear()

    async def main():
        running = asyncio.ensure_future(batcher.run(handle, "serving_default", {"x": np.array([1.0], np.float32)}, None))
        await asyncio.sleep(0.1)
        started = time.perf_counter()
        with pytest.raises(DeadlineExceeded, match="not run"):
            await batcher.run(handle, "serving_default", {"x": np.array([42.0], np.float32)}, time.monotonic() + 0.1)
        waited = time.perf_counter() - started
        recorder.gate.set()
        await running
        await asyncio.sleep(0.05)
        return waited

    waited = asyncio.run(main())
    assert 0.09 < waited < 0.5
    assert all(42.0 not in b for b in recorder.batches)
    assert handle.held.in_flight == 1  # only the test's own hold is left


def test_a_cancelled_request_leaves_the_queue(models, served):
    handle, recorder = served
    batcher = batcher_for(models, mode="fixed", num_batch_threads=1)
    recorder.gate.clear()

    async def main():
        running = asyncio.ensure_future(batcher.run(handle, "serving_default", {"x": np.array([1.0], np.float32)}, None))
        await asyncio.sleep(0.1)
        gone = asyncio.ensure_future(batcher.run(handle, "serving_default", {"x": np.array([13.0], np.float32)}, None))
        await asyncio.sleep(0.05)
        (queue,) = batcher._queues.values()
        assert queue.rows == 1
        gone.cancel()
        await asyncio.sleep(0.05)
        assert queue.rows == 0 and not queue.waiting
        recorder.gate.set()
        await running

    asyncio.run(main())
    assert all(13.0 not in b for b in recorder.batches)


def test_a_request_over_max_batch_size_is_refused_or_split(models, served):
    handle, recorder = served
    x = np.arange(9, dtype=np.float32)
    refusing = batcher_for(models, mode="fixed", max_batch_size=8)
    with pytest.raises(InvalidInput, match="Task size 9 is larger than maximum batch size 8"):
        asyncio.run(refusing.run(handle, "serving_default", {"x": x}, None))
    splitting = batcher_for(models, mode="fixed", max_batch_size=8, enable_large_batch_splitting=True)
    assert asyncio.run(splitting.run(handle, "serving_default", {"x": x}, None))["y"].tolist() == (x / 2 + 2).tolist()
    assert [len(b) for b in recorder.batches] == [8, 1]


def test_fixed_mode_waits_for_its_timeout_and_adaptive_mode_does_not_wait_for_nothing(models, served):
    handle, _ = served

    async def lone(batcher):
        started = time.perf_counter()
        await batcher.run(handle, "serving_default", {"x": np.array([1.0], np.float32)}, None)
        return time.perf_counter() - started

    fixed = batcher_for(models, mode="fixed", batch_timeout_micros=200_000)
    assert asyncio.run(lone(fixed)) >= 0.2
    adaptive = batcher_for(models, mode="adaptive", batch_timeout_micros=200_000)
    assert asyncio.run(lone(adaptive)) < 0.1  # no arrival rate known: nothing to wait for


def test_adaptive_mode_waits_while_slots_fill_faster_than_an_execution(models, served):
    """A steady stream much faster than one execution: the batcher learns it and fills buckets."""
    handle, recorder = served
    batcher = batcher_for(models, mode="adaptive", batch_timeout_micros=50_000, num_batch_threads=1)
    original = recorder.original

    def slow_run(key, inputs):  # 20 ms per execution, whatever the size
        time.sleep(0.02)
        return original(key, inputs)

    recorder.original = slow_run

    async def main():
        async def one(i):
            await asyncio.sleep(i * 0.001)  # a request every millisecond
            return await batcher.run(handle, "serving_default", {"x": np.array([i], np.float32)}, None)

        return await asyncio.gather(*(one(i) for i in range(200)))

    results = asyncio.run(main())
    assert [r["y"].tolist() for r in results] == [[i / 2 + 2] for i in range(200)]
    assert np.mean([len(b) for b in recorder.batches[-5:]]) >= 16


def test_variable_length_inputs_are_padded_to_the_longest():
    padded = _pad_to_largest([np.ones((1, 2)), np.ones((2, 4))])
    assert [p.shape for p in padded] == [(1, 4), (2, 4)] and padded[0][0].tolist() == [1, 1, 0, 0]
