"""Predicting with a stateful signature in a session: the request gives the inputs that are not
state, Kiln loads the session's state (zeros for a new session), runs, writes the new state back by
compare-and-set, and answers the outputs that are not state with the session id.

On TF Serving's REST API the session is named by a top-level "session" key (TF Serving ignores
unknown keys, so its clients still work); a request without one starts a new session. One request
is one session, so its batch is one row. State lost from the store (missing, expired, corrupt,
from another servable version) is an error here: a plain predict keeps no token history to rebuild
it from (:generate does, runtime.generation).
"""

from __future__ import annotations

import numpy as np

from runtime.codecs.tfserving import decode_predict
from runtime.engines.base import initial_state, state_after
from runtime.errors import InvalidInput
from runtime.manifest import Signature
from runtime.repository import ServableHandle


async def predict_in_session(app, handle: ServableHandle, key: str, signature: Signature, parsed: dict,
                             tenant: str, exchange) -> tuple[dict[str, np.ndarray], bool, str]:
    """(the outputs that are not state, whether the request was in row format, the session id)."""
    session = parsed.get("session")
    if session is not None and not isinstance(session, str):
        raise InvalidInput("'session' must be a string")
    visible = signature.model_copy(update={"inputs": tuple(s for s in signature.inputs if s.name not in signature.state)})
    decoded = decode_predict(key, parsed, visible)
    rows = {len(array) for array in decoded.inputs.values() if np.ndim(array)}
    if signature.batched and rows != {1}:
        raise InvalidInput(f"signature '{key}' keeps state per session: a request carries one row, got {sorted(rows)}")
    sessions, store = app.sessions, app.sessions.store()
    fingerprint = sessions.fingerprint(handle)
    if session is None:
        session, version, state = sessions.ids.new(tenant), 0, initial_state(signature, 1)
    else:
        session = sessions.ids.check(tenant, session)
        stored = await store.load(tenant, session, fingerprint)
        version, state = stored.version, dict(stored.tensors)
    outputs = await app.execute(handle, key, {**decoded.inputs, **state}, exchange)
    await store.save(tenant, session, version, state_after(signature, outputs), None, fingerprint)
    state_outputs = set(signature.state.values())
    return {name: array for name, array in outputs.items() if name not in state_outputs}, decoded.row_format, session
