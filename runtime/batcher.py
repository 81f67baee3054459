"""The in-container micro-batcher: requests that arrive together run as one compiled batch
(runtime.runner hands it a request's work where the model's batching is on).

One queue per model version and signature, on the server's event loop. A request's inputs are
checked on their own before they join a queue, so one bad request fails alone; a batch that fails
as a whole is rerun request by request for the same reason. A dispatched batch is the queued
requests in arrival order, up to the dispatch size (max_batch_size, and no more than the largest
compiled bucket, past which a bigger batch only runs its buckets one after another); the engine
pads it to its bucket, and each caller gets exactly its own rows back.

When a batch goes (runtime.batching has the modes): at once when it is full or in `fixed` mode
with no timeout; in `fixed` mode when its oldest request has waited batch_timeout_micros; in
`adaptive` mode while a worker is free, only as long as waiting pays off: the arrival rate learned
so far would bring the rows of the next size up (the free slots of the bucket the queued rows would
be padded to, or the next bucket) sooner than one execution of that size comes back (its round
trip, learned per size as batches run), the timeout has not passed, and no queued request's
deadline would be missed by waiting and then running. Up to
num_batch_threads batches of a queue run at once, in the event loop's thread pool.

Back-pressure: a queue holding max_enqueued_batches batches' worth of rows refuses new requests at
once (ResourceExhausted: 503, RESOURCE_EXHAUSTED). A request whose deadline passes is answered
DeadlineExceeded at that moment, and if it was still queued it is never run; a cancelled one (its
client went away) is dropped from the queue. Requests arriving in one event-loop step (the records
of one Lambda event) are merged without any waiting: a queue is looked at only after the step's
other callbacks have run.

Elementwise signatures (any input shape, runtime/manifest.py) are batched as runs of elements: each
request's inputs are flattened, so requests of different shapes merge without mixing (a "row" is
one element), and each caller's outputs are cut from the run and reshaped to its own shape. As
elements are independent, a request with more elements than max_batch_size is split, never refused.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime import tracing
from runtime.batching import BatchingParameters
from runtime.engines.base import check_inputs
from runtime.errors import DeadlineExceeded, InvalidInput, ResourceExhausted
from runtime.metrics import Metrics
from runtime.repository import Repository, ServableHandle

SMOOTHING = 0.2  # weight of the newest sample in the learned execution times and arrival gaps


@dataclass(eq=False)
class _Request:
    inputs: dict[str, np.ndarray]
    rows: int
    future: asyncio.Future
    deadline: float | None
    release: Callable[[], None]  # the request's own hold on its version
    inner_shapes: tuple = ()
    enqueued: float = field(default_factory=time.monotonic)
    trace: Any = None  # the request's span context (runtime.tracing), which its batch links to


class Batcher:
    def __init__(
        self,
        repository: Repository,
        parameters: Callable[[str], BatchingParameters],
        metrics: Metrics,
        observe: Callable[[ServableHandle, str, int | None, float], None],
    ):
        """`observe`: how an execution is counted (runtime.runner's Runner.observe)."""
        self.repository = repository
        self.parameters = parameters  # by model name
        self.metrics, self.observe = metrics, observe
        self._queues: dict[tuple[str, int, str], _Queue] = {}

    async def run(
        self, handle: ServableHandle, key: str, inputs: dict[str, np.ndarray], deadline: float | None
    ) -> dict[str, np.ndarray]:
        """The signature's outputs for these inputs, run in a batch with whatever else is queued."""
        signature = handle.engine.signature(key)
        arrays, rows = check_inputs(signature, inputs)
        if signature.elementwise:
            shape = next(iter(arrays.values())).shape
            if rows == 0:
                return handle.engine.run(key, arrays)
            runs = await self._run_checked(
                handle, key, {name: a.reshape(-1) for name, a in arrays.items()}, rows, deadline, split=True
            )
            return {name: run.reshape(shape) for name, run in runs.items()}
        return await self._run_checked(handle, key, arrays, rows, deadline, split=False)

    async def _run_checked(
        self,
        handle: ServableHandle,
        key: str,
        arrays: dict[str, np.ndarray],
        rows: int,
        deadline: float | None,
        split: bool,
    ) -> dict[str, np.ndarray]:
        """Checked inputs of `rows` rows, queued whole or split into parts of at most the dispatch
        size; one larger than max_batch_size is refused unless splitting is allowed."""
        parameters = self.parameters(handle.name)
        queue = self._queue(handle, key, parameters)
        if rows <= queue.dispatch_size:
            return await queue.submit(arrays, rows, deadline)
        if rows > parameters.max_batch_size and not (split or parameters.enable_large_batch_splitting):
            raise InvalidInput(f"Task size {rows} is larger than maximum batch size {parameters.max_batch_size}")
        queue.admit(rows)  # all of it or none
        step = queue.dispatch_size
        parts = await asyncio.gather(
            *(
                queue.submit(
                    {name: array[start : start + step] for name, array in arrays.items()},
                    min(step, rows - start),
                    deadline,
                )
                for start in range(0, rows, step)
            )
        )
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def _queue(self, handle: ServableHandle, key: str, parameters: BatchingParameters) -> _Queue:
        queue_key = (handle.name, handle.version, key)
        queue = self._queues.get(queue_key)
        if queue is None or queue.handle.engine is not handle.engine or queue.parameters != parameters:
            # A reloaded version or new parameters: a fresh queue; the old one drains on its own.
            queue = self._queues[queue_key] = _Queue(self, handle, key, parameters)
        return queue

    def forget(self, queue: _Queue) -> None:
        """Drop an idle queue (its version may be unloading; a new request makes a fresh one)."""
        queue_key = (queue.handle.name, queue.handle.version, queue.key)
        if self._queues.get(queue_key) is queue:
            del self._queues[queue_key]


class _Queue:
    """One model version's signature: its waiting requests, running batches, and what it has
    learned of execution times and arrivals."""

    def __init__(self, batcher: Batcher, handle: ServableHandle, key: str, parameters: BatchingParameters):
        self.batcher, self.handle, self.key, self.parameters = batcher, handle, key, parameters
        engine_buckets = handle.engine.manifest.batch_sizes
        self.sizes = parameters.allowed_batch_sizes or tuple(b for b in engine_buckets if b < parameters.max_batch_size)
        if not parameters.allowed_batch_sizes:
            self.sizes = (*self.sizes, min(parameters.max_batch_size, engine_buckets[-1]))
        self.dispatch_size = self.sizes[-1]
        self.capacity = parameters.max_enqueued_batches * parameters.max_batch_size  # TF Serving's batches
        self.waiting: deque[_Request] = deque()
        self.rows = 0
        self.running = 0
        self.execution: dict[int, float] = {}  # size -> learned seconds
        self.gap: float | None = None  # learned seconds between requests
        self.rows_per_request: float = 1.0
        self.last_arrival: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        engine = handle.engine
        self.call = engine.run_elements if engine.signature(key).elementwise else engine.run  # one batch
        self.depth = batcher.metrics.queue_depth.labels(handle.name)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self, rows: int) -> None:
        if self.rows + rows > self.capacity:
            raise ResourceExhausted(
                f"the batching queue of model {self.handle.name!r} is full "
                f"({self.rows} rows waiting, room for {self.capacity}); retry later"
            )

    async def submit(self, inputs: dict[str, np.ndarray], rows: int, deadline: float | None) -> dict[str, np.ndarray]:
        self.admit(rows)
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded("the request's deadline passed before it could be queued")
        loop = asyncio.get_running_loop()
        request = _Request(
            inputs,
            rows,
            loop.create_future(),
            deadline,
            self.batcher.repository.retain(self.handle),
            tuple(a.shape[1:] for a in inputs.values()),
            now,
            tracing.link(),
        )
        self._learn_arrival(now, rows)
        self.waiting.append(request)
        self.rows += rows
        self.depth.inc()
        loop.call_soon(self.pump)  # after this step's other arrivals have joined
        try:
            if deadline is None:
                return await asyncio.shield(request.future)
            return await asyncio.wait_for(asyncio.shield(request.future), deadline - time.monotonic())
        except TimeoutError:
            queued = self._withdraw(request)
            where = "in the batching queue; it was not run" if queued else "while its batch ran"
            raise DeadlineExceeded(f"the request's deadline passed {where}") from None
        except asyncio.CancelledError:  # the client went away
            self._withdraw(request)
            raise

    def _withdraw(self, request: _Request) -> bool:
        """Take a request that will not be answered out of the queue; whether it was still queued."""
        request.future.cancel()  # a running batch will not answer it
        if request not in self.waiting:
            return False
        self.waiting.remove(request)
        self.rows -= request.rows
        self.depth.dec()
        request.release()
        return True

    # Deciding when a batch goes -----------------------------------------------------------------

    def pump(self) -> None:
        """Dispatch what should go now, and set the timer for the next look."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        now = time.monotonic()
        while self.waiting and self.running < self.parameters.num_batch_threads:
            when = self._dispatch_at(now)
            if when > now:
                self.timer = asyncio.get_running_loop().call_at(when, self.pump)
                break
            self._dispatch(self._take())
        if not self.busy:
            self.batcher.forget(self)

    def _dispatch_at(self, now: float) -> float:
        """When the waiting requests should go (a time not after now: at once)."""
        mode, oldest = self.parameters.mode, self.waiting[0].enqueued
        if self.rows >= self.dispatch_size:
            return now
        latest = oldest + self.parameters.timeout_seconds
        if mode == "fixed":
            return latest
        # The next size up: the free slots of the bucket the rows would be padded to, or for a full
        # bucket the next one's. Worth waiting for while the rows to fill it would arrive before one
        # execution of it could even come back (they would otherwise wait for a batch of their own).
        size = next(s for s in self.sizes if s > self.rows)
        execution = self._execution_estimate(size)
        rate = self._arrival_rate(now)
        if execution is None or not rate:
            return now
        fill = (size - self.rows) / rate
        if fill > execution:
            return now
        deadlines = [r.deadline - execution for r in self.waiting if r.deadline is not None]
        return min([now + fill, latest, *deadlines])

    def _execution_estimate(self, size: int) -> float | None:
        if size in self.execution:
            return self.execution[size]
        smaller = [s for s in self.execution if s < size]  # an unmeasured bigger bucket costs at least as much
        return self.execution[max(smaller)] if smaller else None

    def _arrival_rate(self, now: float) -> float | None:
        """Rows per second lately; it falls as soon as requests stop coming."""
        if self.gap is None or self.last_arrival is None:
            return None
        gap = max(self.gap, now - self.last_arrival)
        return self.rows_per_request / gap if gap > 0 else None

    def _learn_arrival(self, now: float, rows: int) -> None:
        if self.last_arrival is not None:
            gap = now - self.last_arrival
            self.gap = gap if self.gap is None else (1 - SMOOTHING) * self.gap + SMOOTHING * gap
        self.rows_per_request = (1 - SMOOTHING) * self.rows_per_request + SMOOTHING * rows
        self.last_arrival = now

    # Forming, running and answering a batch --------------------------------------------------------

    def _take(self) -> list[_Request]:
        """Waiting requests in arrival order up to the dispatch size (the first always), skipping
        ones whose inner shapes differ from the first's unless they will be padded."""
        first = self.waiting[0]
        batch: list[_Request] = []
        skipped: deque[_Request] = deque()
        rows = 0
        while self.waiting and (not batch or rows + self.waiting[0].rows <= self.dispatch_size):
            request = self.waiting.popleft()
            if batch and request.inner_shapes != first.inner_shapes and not self.parameters.pad_variable_length_inputs:
                skipped.append(request)
                continue
            batch.append(request)
            rows += request.rows
        self.waiting.extendleft(reversed(skipped))
        self.rows -= rows
        self.depth.dec(len(batch))
        return batch

    def _dispatch(self, batch: list[_Request]) -> None:
        self.running += 1
        loop = asyncio.get_running_loop()
        dispatched = time.monotonic()
        work = loop.run_in_executor(None, self._execute, batch)
        work.add_done_callback(lambda done: self._answer(batch, done, dispatched))

    def _execute(self, batch: list[_Request]) -> tuple[list, bool]:
        """In a worker thread: the batch's outputs for each request (or its error), and whether
        it ran as one execution of one bucket (so its time says what that bucket costs)."""
        rows = sum(r.rows for r in batch)
        try:
            started = time.perf_counter()
            with tracing.batch([r.trace for r in batch], [r.enqueued for r in batch], rows=rows, requests=len(batch)):
                outputs = self.call(self.key, self._merge(batch))
            elapsed = time.perf_counter() - started
        except Exception as e:
            if len(batch) == 1:
                return [e], False
            return [self._run_alone(request) for request in batch], False
        self.batcher.observe(self.handle, self.key, rows, elapsed)
        results, start = [], 0
        for request in batch:
            results.append({name: array[start : start + request.rows] for name, array in outputs.items()})
            start += request.rows
        return results, rows <= self.dispatch_size

    def _run_alone(self, request: _Request):
        try:
            return self.call(self.key, request.inputs)
        except Exception as e:  # this request's own failure, answered to it alone
            return e

    def _merge(self, batch: list[_Request]) -> dict[str, np.ndarray]:
        if len(batch) == 1:
            return batch[0].inputs
        merged = {}
        for name in batch[0].inputs:
            arrays = [r.inputs[name] for r in batch]
            if self.parameters.pad_variable_length_inputs:
                arrays = _pad_to_largest(arrays)
            merged[name] = np.concatenate(arrays)
        return merged

    def _answer(self, batch: list[_Request], done: asyncio.Future, dispatched: float) -> None:
        """On the event loop: hand each caller its result, learn the bucket's round trip (dispatch
        to answer: the run, and what handing it to a thread and back costs on a busy server),
        look again."""
        self.running -= 1
        try:
            results, one_run = done.result()
        except Exception as e:  # _execute catches the model's errors; this is a bug
            results, one_run = [e] * len(batch), False
        if one_run:
            elapsed = time.monotonic() - dispatched
            size = next((s for s in self.sizes if s >= sum(r.rows for r in batch)), self.dispatch_size)
            previous = self.execution.get(size)
            self.execution[size] = elapsed if previous is None else (1 - SMOOTHING) * previous + SMOOTHING * elapsed
        for request, result in zip(batch, results):
            request.release()
            if request.future.done():  # withdrawn: its client went away or its deadline passed
                continue
            if isinstance(result, BaseException):
                request.future.set_exception(result)
            else:
                request.future.set_result(result)
        self.pump()


def _pad_to_largest(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Zero-pad each array's inner dimensions to the largest in the batch (pad_variable_length_inputs)."""
    target = np.max([a.shape[1:] for a in arrays], axis=0)
    return [np.pad(a, [(0, 0), *((0, int(t) - s) for t, s in zip(target, a.shape[1:]))]) for a in arrays]
