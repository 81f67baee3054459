"""Model work, in one place: every signature run a request asks for (REST, gRPC, Lambda, Cloud Run,
scoring) goes through `Runner.run`. It keeps to the request's deadline, runs the signature alone in
the event loop's thread pool (the loop stays free) or hands it to the micro-batcher (runtime.batcher)
where the model's batching is on, and records it: TF Serving's runtime latency per request (queue and
batch included), and per execution its rows and seconds (`Runner.observe`, which the batcher's batches
and the decode loop's steps count with too). A request whose deadline passes first answers
DeadlineExceeded; its work is skipped if it has not started yet (batched: if it is still queued)."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable

import numpy as np

from runtime import tracing
from runtime.batcher import Batcher
from runtime.batching import BatchingParameters
from runtime.errors import DeadlineExceeded
from runtime.metrics import Metrics
from runtime.repository import Repository, ServableHandle


def time_left(deadline: float | None) -> float | None:
    """Seconds until the deadline (None: there is none); DeadlineExceeded once it has passed."""
    if deadline is None:
        return None
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DeadlineExceeded("the request's deadline passed before its model work could start")
    return remaining


class Runner:
    def __init__(
        self,
        repository: Repository,
        metrics: Metrics,
        batching: Callable[[str], BatchingParameters] | None = None,
    ):
        """`batching`: each model's batching parameters by name; None runs every request alone."""
        self.repository, self.metrics = repository, metrics
        self.batcher = Batcher(repository, batching, metrics, self.observe) if batching is not None else None

    async def run(
        self, handle: ServableHandle, key: str, inputs: dict[str, np.ndarray], deadline: float | None, api: str
    ) -> dict[str, np.ndarray]:
        """The signature's outputs for these inputs; `api` names the request's kind in the metrics."""
        remaining = time_left(deadline)
        started = time.perf_counter()
        with tracing.model_span(handle.name, handle.version, key):
            batcher = self.batcher
            if (
                batcher is not None
                and batcher.parameters(handle.name).mode != "off"
                and handle.engine.signature(key).batched
            ):
                outputs = await batcher.run(handle, key, inputs, deadline)
            else:
                outputs = await self._alone(handle, key, inputs, remaining)
        engine = handle.engine.signature(key).engine
        self.metrics.tfserving.runtime(handle.name, api, engine, time.perf_counter() - started)
        return outputs

    async def _alone(
        self, handle: ServableHandle, key: str, inputs: dict[str, np.ndarray], remaining: float | None
    ) -> dict[str, np.ndarray]:
        """One execution in the thread pool, holding its version until it ends (it may outlive a
        request that gave up at its deadline); skipped if the request gave up before it began."""
        abandoned = False
        release = self.repository.retain(handle)
        queue = self.metrics.queue_depth.labels(handle.name)

        def work() -> dict[str, np.ndarray]:
            try:
                if abandoned:
                    raise DeadlineExceeded("abandoned")
                started = time.perf_counter()
                with tracing.span("kiln.engine"):
                    outputs = handle.engine.run(key, inputs)
                signature = handle.engine.signatures.get(key)
                first = next(iter(inputs.values()), None)
                rows = (
                    None
                    if signature is None or not signature.batched or first is None
                    else np.size(first)
                    if signature.elementwise
                    else len(first)
                )
                self.observe(handle, key, rows, time.perf_counter() - started)
                return outputs
            finally:
                queue.dec()
                release()

        queue.inc()
        future = asyncio.get_running_loop().run_in_executor(None, contextvars.copy_context().run, work)
        try:
            return await asyncio.wait_for(asyncio.shield(future), remaining)
        except TimeoutError:
            abandoned = True
            raise DeadlineExceeded(
                f"the request's deadline passed after {(remaining or 0) * 1e3:.0f} ms, before the model answered"
            ) from None

    def observe(self, handle: ServableHandle, key: str, rows: int | None, seconds: float) -> None:
        """Count one execution of a signature: its rows (None: unbatched) and its seconds."""
        labels = (handle.name, str(handle.version), key)
        if rows is not None:
            self.metrics.batch_size.labels(*labels).observe(rows)
        self.metrics.executed(labels, seconds)
