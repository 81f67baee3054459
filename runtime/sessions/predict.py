"""Predicting with a stateful signature in a session: the request gives the inputs that are not
state, Kiln loads the session's state (zeros for a new session), runs, writes the new state back by
compare-and-set, and answers the outputs that are not state with the session id.

A request names its session by a top-level "session" key on TF Serving's REST API (TF Serving
ignores unknown keys, so its clients still work), or by the `sequence_id` parameter in the Open
Inference Protocol (where `sequence_end: true` also deletes the session once answered); a request
without one starts a new session. One request is one session, so its batch is one row. State lost
from the store (missing, expired, corrupt, from another servable version) is an error here: a plain
predict keeps no token history to rebuild it from (:generate does, runtime.sessions.generate).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from runtime.codecs.tfserving import decode_predict
from runtime.core import Core
from runtime.errors import InvalidInput
from runtime.exchange import Exchange
from runtime.manifest import Signature
from runtime.repository import ServableHandle
from runtime.sessions.state import initial_state, state_after, trim_state, untrim_state


def visible(signature: Signature) -> Signature:
    """The signature as a client sees it: without the state inputs and outputs the store supplies."""
    outputs = set(signature.state.values())
    return signature.replace(
        inputs=tuple(s for s in signature.inputs if s.name not in signature.state),
        outputs=tuple(s for s in signature.outputs if s.name not in outputs),
    )


async def run_in_session(
    app: Core,
    handle: ServableHandle,
    key: str,
    signature: Signature,
    inputs: dict[str, np.ndarray],
    session: object,
    tenant: str,
    exchange: Exchange,
    end: bool = False,
) -> tuple[dict[str, np.ndarray], str]:
    """(the outputs that are not state, the session id) for one row of inputs that are not state;
    with `end`, the session is deleted instead of saved."""
    if session is not None and not isinstance(session, str):
        raise InvalidInput(f"a session id is a string that Kiln gave in an earlier answer, got {session!r}")
    rows = {len(array) for array in inputs.values() if np.ndim(array)}
    if signature.batched and rows != {1}:
        raise InvalidInput(f"signature '{key}' keeps state per session: a request carries one row, got {sorted(rows)}")
    sessions, store = app.sessions, app.sessions.store()
    fingerprint = sessions.fingerprint(handle)
    state, signatures = initial_state(signature, 1), handle.engine.signatures
    if session is None:
        session_id, version = sessions.ids.new(tenant), 0
    else:
        session_id = sessions.ids.check(tenant, session)
        stored = await store.load(tenant, session_id, fingerprint)
        version = stored.version
        untrim_state(signatures, stored.tensors, state)
    inputs = {**inputs, **state}
    outputs = await app.execute(handle, key, inputs, exchange)
    if end:
        await store.delete(tenant, session_id)
    else:
        await store.save(
            tenant,
            session_id,
            version,
            trim_state(signatures, state_after(signature, outputs, inputs)),
            None,
            fingerprint,
        )
    state_outputs = set(signature.state.values())
    return {name: array for name, array in outputs.items() if name not in state_outputs}, session_id


async def predict_in_session(
    app: Core, handle: ServableHandle, key: str, signature: Signature, parsed: dict, tenant: str, exchange: Exchange
) -> tuple[dict[str, np.ndarray], bool, str]:
    """A TF Serving predict request in a session: (outputs, whether it was in row format, session id)."""
    decoded = decode_predict(key, parsed, visible(signature))
    outputs, session = await run_in_session(
        app, handle, key, signature, decoded.inputs, parsed.get("session"), tenant, exchange
    )
    return outputs, decoded.row_format, session


async def infer_in_session(
    app: Core,
    handle: ServableHandle,
    key: str,
    signature: Signature,
    inputs: dict[str, np.ndarray],
    parameters: Mapping,
    tenant: str,
    exchange: Exchange,
) -> tuple[dict[str, np.ndarray], str]:
    """An Open Inference Protocol infer (REST or gRPC) in the session its sequence_id parameter
    names; sequence_end: true deletes the session once answered."""
    end = parameters.get("sequence_end", False)
    if not isinstance(end, bool):
        raise InvalidInput(f"the request: parameter sequence_end must be true or false, got {end!r}")
    return await run_in_session(
        app, handle, key, signature, inputs, parameters.get("sequence_id"), tenant, exchange, end
    )
