"""A stateful signature's state (runtime.manifest has the pairings): a new session's, the state
after a call, and the state as a session store keeps it.

An appended state (a K/V cache) is stored only up to its position: the entries past it were never
written, or are left over from padding, and every call masks them, so a 40-token session stores
40 tokens' worth of its 2048-slot cache, and reads back zeros for the rest.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from runtime.engines.base import synthetic_inputs
from runtime.errors import InvalidInput, SessionCorrupt
from runtime.manifest import Position, Signature


def initial_state(signature: Signature, rows: int) -> dict[str, np.ndarray]:
    """The state of `rows` new sessions (one for an unbatched signature): zeros, by state input."""
    state = tuple(spec for spec in signature.inputs if spec.name in signature.state)
    return synthetic_inputs(signature.replace(inputs=state), rows)


def state_after(
    signature: Signature, outputs: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The sessions' state to save after a call, by state input: each one's paired output, or for an
    appended state its input with the output's entries written at each row's position.

    A row whose position went past the signature's capacity overflowed its state (a K/V cache
    holds no more tokens): InvalidInput names it, and nothing of the call may be saved.
    """
    overflowing = overflowed(signature, outputs)
    if overflowing is not None:
        raise overflowing
    state = {}
    for name, output in signature.state.items():
        if name in signature.appended:
            state[name] = np.array(inputs[name])
            write_appended(signature, name, state[name], outputs[output], inputs[_position(signature).input])
        else:
            state[name] = outputs[output]
    return state


def past_capacity(signature: Signature, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """Whether each row's position went past the signature's capacity (all False without a position)."""
    position = signature.position
    if position is None:
        return np.zeros(len(next(iter(outputs.values()))) if signature.batched else 1, bool)
    return np.asarray(outputs[signature.state[position.input]]).reshape(-1) > position.capacity


def overflowed(signature: Signature, outputs: Mapping[str, np.ndarray]) -> InvalidInput | None:
    """The error naming the rows whose position went past the signature's capacity, if any."""
    over = np.flatnonzero(past_capacity(signature, outputs))
    if not over.size:
        return None
    held = np.asarray(outputs[signature.state[_position(signature).input]]).reshape(-1)
    return InvalidInput(
        f"the session state holds at most {_position(signature).capacity} tokens; this call would "
        f"take row(s) {', '.join(map(str, over[:10]))} to {held[over[0]]}"
    )


def write_appended(
    signature: Signature,
    name: str,
    held: np.ndarray,
    entries: np.ndarray,
    position: np.ndarray,
    rows: np.ndarray | None = None,
) -> None:
    """Write an appended state's new entries into `held`, in place: the entries of each of `rows`
    (default: all, in order) at its position, those past the capacity dropped (state_after refuses
    such a call). One scatter for all rows."""
    axis = signature.append_axis(name)
    if not signature.batched:
        held, entries, axis = held[None], entries[None], axis + 1
    held, entries = np.moveaxis(held, axis, 1), np.moveaxis(entries, axis, 1)
    at = np.asarray(position).reshape(-1)
    rows = np.arange(len(at)) if rows is None else np.asarray(rows)
    slots = at[:, None] + np.arange(entries.shape[1])
    kept = slots < held.shape[1]
    held[np.broadcast_to(rows[:, None], slots.shape)[kept], slots[kept]] = entries[kept]


def trim_state(signatures: Mapping[str, Signature], state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The state as stored: each appended state cut after its rows' largest position."""
    trimmed = dict(state)
    for name, (signature, axis) in appended_states(signatures).items():
        if name in state:
            filled = int(np.max(state[_position(signature).input], initial=0))
            trimmed[name] = np.take(state[name], np.arange(min(filled, state[name].shape[axis])), axis=axis)
    return trimmed


def untrim_state(
    signatures: Mapping[str, Signature], stored: Mapping[str, np.ndarray], into: Mapping[str, np.ndarray]
) -> None:
    """Write a stored state into arrays of the full shape (`into`, by state input), zeros past what
    was stored; SessionCorrupt (never used) when what is stored does not fit them."""
    appended = appended_states(signatures)
    if set(stored) != set(into):
        raise SessionCorrupt(
            f"the stored state holds {', '.join(sorted(stored)) or 'nothing'}, but the model's "
            f"state is {', '.join(sorted(into))}"
        )
    for name, target in into.items():
        array, axis = np.asarray(stored[name]), appended.get(name, (None, None))[1]
        fits = (
            array.dtype == target.dtype
            and array.ndim == target.ndim
            and all(
                got == want or (dimension == axis and got <= want)
                for dimension, (got, want) in enumerate(zip(array.shape, target.shape))
            )
        )
        if not fits:
            raise SessionCorrupt(
                f"the stored state '{name}' is {array.dtype}{list(array.shape)}, which does not fit "
                f"the model's {target.dtype}{list(target.shape)}"
            )
        if axis is None:
            target[...] = array
            continue
        length = array.shape[axis]
        head = [slice(None)] * target.ndim
        head[axis] = slice(0, length)
        target[tuple(head)] = array
        head[axis] = slice(length, None)
        target[tuple(head)] = 0
    for name, (signature, axis) in appended.items():
        position = _position(signature).input
        if name in into and position in into and np.max(into[position], initial=0) > stored[name].shape[axis]:
            raise SessionCorrupt(
                f"the stored state '{name}' holds {stored[name].shape[axis]} entries, fewer than "
                f"its position {int(np.max(into[position]))}"
            )


def appended_states(signatures: Mapping[str, Signature]) -> dict[str, tuple[Signature, int]]:
    """{state input: (a signature appending to it, its axis)} over all the servable's signatures."""
    found: dict[str, tuple[Signature, int]] = {}
    for signature in signatures.values():
        for name in signature.appended:
            found.setdefault(name, (signature, signature.append_axis(name)))
    return found


def _position(signature: Signature) -> Position:
    """The position of a signature with an appended state (runtime.manifest refuses one without)."""
    assert signature.position is not None, "an appended state always has a position"
    return signature.position
