"""An optional cache of predictions for stateless signatures, in the session store's storage.

An entry is keyed by the tenant and a BLAKE2b digest of the servable fingerprint, the signature and
every input's name, dtype, shape and bytes; its value is the outputs in the stored tensor format
(runtime.sessions.encoding), each carrying the fingerprint again, checked on every hit. So a hit
never crosses tenants, servable versions or signatures, and a corrupt entry is a miss (and removed),
never an answer. Entries expire `ttl_seconds` after they were written.

A hit skips the batcher and the engine; the caller decides which signatures may be cached (only
deterministic, stateless ones) and wires it in; it is off unless configured. The cache is an
optimisation: when the store does not answer, get() misses and put() does nothing, with a warning.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping

import numpy as np

from runtime.errors import ConfigError, InvalidInput, StoreUnavailable
from runtime.sessions.encoding import encode, pack, unpack
from runtime.sessions.keys import check_tenant, prediction_key
from runtime.sessions.store import SessionStore

DEFAULT_MAX_ENTRY_BYTES = 1 << 20

log = logging.getLogger(__name__)


class PredictionCache:
    def __init__(self, store: SessionStore, *, ttl_seconds: float, max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES):
        if not ttl_seconds > 0:
            raise ConfigError(f"the prediction cache's time to live must be positive, got {ttl_seconds!r}")
        self.backend = store.backend
        self.ttl_ms = max(1, round(ttl_seconds * 1000))
        self.max_entry_bytes = max_entry_bytes

    def key(self, tenant: str, fingerprint: str, signature: str, inputs: Mapping[str, np.ndarray]) -> str:
        digest = hashlib.blake2b(digest_size=32, person=b"kiln-prediction")
        for text in (check_tenant(tenant), fingerprint, signature):
            digest.update(len(text.encode()).to_bytes(8, "little") + text.encode())
        for name in sorted(inputs):
            encoded = encode(name, inputs[name])  # canonical: contiguous little-endian, with dtype and shape
            digest.update(len(encoded.header).to_bytes(8, "little") + encoded.header)
            for chunk in encoded.chunks:
                digest.update(chunk)
        return prediction_key(tenant, digest.hexdigest())

    async def get(
        self, tenant: str, fingerprint: str, signature: str, inputs: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray] | None:
        """The cached outputs for exactly these inputs, or None (also for inputs it cannot hold, such as strings)."""
        try:
            key = self.key(tenant, fingerprint, signature, inputs)
            (value,) = await self.backend.get([key])
        except InvalidInput:
            return None
        except StoreUnavailable as e:
            log.warning("prediction cache miss: %s", e)
            return None
        if value is None:
            return None
        try:
            outputs = unpack(value)
            if any(header.fingerprint != fingerprint for header, _ in outputs):
                raise ValueError(f"an entry of another servable ({outputs[0][0].fingerprint!r})")
        except ValueError as e:
            log.warning("prediction cache: removing a corrupt entry: %s", e)
            await self._forget(key)
            return None
        return {header.name: array for header, array in outputs}

    async def put(
        self,
        tenant: str,
        fingerprint: str,
        signature: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
    ) -> bool:
        """Cache `outputs` for these inputs; False when they are over the entry limit, not numeric
        tensors (strings are not cached), or the store fails."""
        if not outputs or sum(np.asarray(array).nbytes for array in outputs.values()) > self.max_entry_bytes:
            return False
        try:
            value = b"".join(pack(name, outputs[name], fingerprint) for name in sorted(outputs))
            key = self.key(tenant, fingerprint, signature, inputs)
        except InvalidInput:
            return False
        try:
            await self.backend.put([(key, value)], self.ttl_ms)
        except StoreUnavailable as e:
            log.warning("prediction cache: not stored: %s", e)
            return False
        return True

    async def _forget(self, key: str) -> None:
        try:
            await self.backend.delete([key])
        except StoreUnavailable:
            pass
