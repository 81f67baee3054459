"""Continuous batching of a generative servable's calls, with every active session's state resident
in one array between them.

Sessions generating with the same servable version take a seat (a row) in its loop's pool: the
pool holds each state input for all seats, [seats, ...], allocated aligned so that the xla-aot
runner passes it to the compiled code by pointer. A session asks the loop to run one of the
stateful signatures (a prefill chunk, a decode step) on its row, giving only the inputs that are
not state; a step runs each signature asked for once, over the first `bucket` rows, for every
session that asked for it, and writes each one's new state into its row in place: for an appended
state (a K/V cache, runtime.manifest) only the new entries, so a decode step moves one token's
worth of cache rather than all of it, and for a state fed back whole, its output row. A session
brings its state when it sits down (zeros for a new one) and takes it away when it leaves, both as
stored (runtime.sessions.state: the filled part of a cache only), so new sessions join and finished ones
leave between steps. Seats are kept packed at the front of the pool (the last moves into a seat that
is left), so a step's bucket is the next size up from the rows in use.

A step starts when every seated session has asked, or GATHER_SECONDS after the first asked (a
streaming client slow to take its tokens does not hold up the others); rows that did not ask run
along, but their results are dropped and their state is left as it was. A session may sit down
while a step runs over the row it takes (the bucket reaching past the seated rows): the step does
not use that row's results, and rows are independent, so a joining session never waits for a gap.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable, Mapping

import numpy as np

from runtime.aligned import aligned_zeros
from runtime.codecs.tfserving import row_shape
from runtime.errors import InvalidInput
from runtime.repository import ServableHandle
from runtime.sessions.state import (
    appended_states,
    overflowed,
    past_capacity,
    trim_state,
    untrim_state,
    write_appended,
)

GATHER_SECONDS = 0.002

Observe = Callable[[ServableHandle, str, int, float], None]  # runtime.runner's Runner.observe


class Seat:
    """One session's place in a loop; `row` moves when the pool is packed."""

    def __init__(self, row: int):
        self.row = row
        self.key = ""  # the signature asked for, with these inputs, answered through `answer`
        self.inputs: Mapping[str, np.ndarray] = {}
        self.answer: asyncio.Future | None = None


class DecodeLoop:
    """One servable version's stateful calls, run together (see the module's documentation)."""

    def __init__(self, handle: ServableHandle, observe: Observe):
        self.handle, self.observe = handle, observe
        self.signatures = {key: sig for key, sig in handle.engine.signatures.items() if sig.state and sig.batched}
        self.buckets = handle.engine.manifest.batch_sizes
        self.seats: list[Seat] = []
        self.pool: dict[str, np.ndarray] = {}
        self.axes = {name: axis for name, (_, axis) in appended_states(self.signatures).items()}
        self.filled = np.zeros(self.capacity, np.intp)  # each row's appended states are zeros past this
        self._free = asyncio.Condition()  # held around every change of the seats; notified when one frees
        self._timer: asyncio.TimerHandle | None = None
        self._stepping = False

    @property
    def capacity(self) -> int:
        return self.buckets[-1]

    async def join(self, stored: Mapping[str, np.ndarray] | None) -> Seat:
        """Seat a session with its state as stored (one row; None: a new session's zeros), waiting
        for a free seat. SessionCorrupt when the stored state does not fit the model."""
        async with self._free:
            await self._free.wait_for(lambda: len(self.seats) < self.capacity)
            if not self.pool:
                specs = {
                    spec.name: spec for sig in self.signatures.values() for spec in sig.inputs if spec.name in sig.state
                }
                self.pool = {
                    name: aligned_zeros((self.capacity, *row_shape(spec)), spec.dtype) for name, spec in specs.items()
                }
            seat = Seat(len(self.seats))
            held = (
                0
                if stored is None
                else max((stored[name].shape[axis] for name, axis in self.axes.items() if name in stored), default=0)
            )
            row = self._row(seat.row, max(held, self.filled[seat.row]))  # zeros past that already
            if stored is None:
                for array in row.values():
                    array[...] = 0
            else:
                untrim_state(self.signatures, stored, row)
            self.filled[seat.row] = held
            self.seats.append(seat)
            return seat

    def _row(self, row: int, extent: int) -> dict[str, np.ndarray]:
        """Views of one row of the pool, its appended states cut at `extent` along their axis."""
        views = {}
        for name, rows in self.pool.items():
            view = rows[row : row + 1]
            if name in self.axes:
                view = view[(slice(None),) * self.axes[name] + (slice(0, extent),)]
            views[name] = view
        return views

    async def run(self, seat: Seat, key: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run signature `key` on a seated session's row with `inputs` (those not state, one row):
        its outputs that are not state, once its state has advanced."""
        seat.key, seat.inputs, seat.answer = key, inputs, asyncio.get_running_loop().create_future()
        self._schedule()
        try:
            return await seat.answer
        finally:
            seat.answer = None

    async def leave(self, seat: Seat) -> dict[str, np.ndarray]:
        """Unseat a session, after any step in flight: its state as stored (one row)."""
        async with self._free:
            await self._free.wait_for(lambda: not self._stepping)
            state = trim_state(self.signatures, self._row(seat.row, self.filled[seat.row]))
            state = {name: np.array(array) for name, array in state.items()}  # not views of the pool
            last = self.seats.pop()
            if last is not seat:  # the last seat moves into this one, only as far as either was written
                moved, into = self.filled[last.row], max(self.filled[last.row], self.filled[seat.row])
                source, target = self._row(last.row, into), self._row(seat.row, into)
                for name in self.pool:
                    target[name][...] = source[name]
                self.filled[seat.row] = moved
                last.row = seat.row
                self.seats[seat.row] = last
            self._free.notify_all()
        self._schedule()  # the others may all be waiting for this one
        return state

    def _waiting(self) -> list[Seat]:
        return [seat for seat in self.seats if seat.answer is not None and not seat.answer.done()]

    def _schedule(self) -> None:
        """Start a step now if every seat has asked, else soon after the first asked."""
        if self._stepping:
            return
        waiting = self._waiting()
        if waiting and len(waiting) == len(self.seats):
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._start(waiting)
        elif waiting and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(GATHER_SECONDS, self._gathered)

    def _gathered(self) -> None:
        self._timer = None
        waiting = self._waiting()
        if waiting and not self._stepping:
            self._start(waiting)

    def _start(self, seats: list[Seat]) -> None:
        self._stepping = True
        asyncio.get_running_loop().create_task(self._step(seats))

    async def _step(self, seats: list[Seat]) -> None:
        try:
            asks: dict[str, dict[int, Mapping[str, np.ndarray]]] = {}
            for seat in seats:
                asks.setdefault(seat.key, {})[seat.row] = seat.inputs
            loop = asyncio.get_running_loop()
            outcome: dict[int, dict | Exception] = {}
            for key, rows in asks.items():
                try:
                    outcome |= await loop.run_in_executor(None, contextvars.copy_context().run, self._call, key, rows)
                except Exception as error:  # the model failed: every session in the call hears why
                    outcome |= {row: error for row in rows}
            for seat in seats:
                result = outcome[seat.row]
                if seat.answer is None or seat.answer.done():
                    continue
                if isinstance(result, Exception):
                    seat.answer.set_exception(result)
                else:
                    seat.answer.set_result(result)
        finally:
            async with self._free:
                self._stepping = False
                self._free.notify_all()
            self._schedule()

    def _call(self, key: str, asks: dict[int, Mapping[str, np.ndarray]]) -> dict[int, dict | Exception]:
        """In a worker thread: one call of signature `key` over the pool's first rows, each asking
        row's inputs in its place; each asking row's outputs that are not state (or why not), its
        state advanced in the pool."""
        signature = self.signatures.get(key)
        if signature is None:
            raise InvalidInput(f"signature '{key}' is not a batched stateful signature of this model")
        bucket = next(b for b in self.buckets if b > max(asks))
        inputs = {name: rows[:bucket] for name, rows in self.pool.items() if name in signature.state}
        for spec in signature.inputs:
            if spec.name not in signature.state:
                inputs[spec.name] = np.zeros((bucket, *row_shape(spec)), spec.dtype)
                for row, given in asks.items():
                    inputs[spec.name][row] = given[spec.name][0]
        started = time.perf_counter()
        outputs = self.handle.engine.run(key, inputs)
        self.observe(self.handle, key, len(asks), time.perf_counter() - started)
        asking = np.fromiter(asks, np.intp, len(asks))
        over = past_capacity(signature, {name: array[asking] for name, array in outputs.items()})
        rows = asking[~over]
        if signature.position is not None:
            position = inputs[signature.position.input][rows]  # before the call, to append at
        for name, output in signature.state.items():
            if name in signature.appended:
                entries = outputs[output][rows]
                write_appended(signature, name, self.pool[name], entries, position, rows)
                self.filled[rows] = np.maximum(
                    self.filled[rows],
                    np.minimum(position + entries.shape[self.axes[name]], self.pool[name].shape[self.axes[name]]),
                )
            else:
                self.pool[name][rows] = outputs[output][rows]
        results: dict[int, dict | Exception] = {}
        for row in asking[over].tolist():
            error = overflowed(signature, {name: array[row : row + 1] for name, array in outputs.items()})
            results[row] = error or InvalidInput("the session's state overflowed")  # error: the row is over
        visible = [name for name in outputs if name not in signature.state.values()]
        for row in rows.tolist():  # the engine's outputs are its own copies: views of them are safe
            results[row] = {name: outputs[name][row : row + 1] for name in visible}
        return results
