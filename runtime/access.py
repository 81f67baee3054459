"""Who may call: API-key or bearer-token authentication, and CORS for browsers.

Keys come from the environment only (KILN_API_KEYS), never from code or configuration files: a
comma-separated list of `KEY` or `TENANT:KEY` entries. A request presents one as
`Authorization: Bearer KEY` or `X-API-Key: KEY` (gRPC: the same metadata keys); the key's tenant
(`default` for a bare key) names whose data the request may touch. Without KILN_API_KEYS every
request is let in. Health and metrics endpoints stay open, so probes and scrapers need no key.

CORS (KILN_CORS_ORIGINS or `kiln serve --cors-origins`: `*` or a comma-separated list of origins)
answers preflights and marks answers to allowed origins; without it no CORS headers are sent and
browsers keep their same-origin rule.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass

from runtime.errors import ConfigError, PermissionDenied, Unauthenticated

DEFAULT_TENANT = "default"
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/metrics", "/monitoring/prometheus/metrics"})
ALLOWED_METHODS = "GET, POST, DELETE, OPTIONS"
EXPOSED_HEADERS = "X-Request-Id, X-Kiln-Session, Inference-Header-Content-Length"
PREFLIGHT_MAX_AGE = "600"


@dataclass(frozen=True)
class Auth:
    """The accepted keys, each with its tenant; empty: authentication is off."""

    keys: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Auth:
        entries = [entry.strip() for entry in environ.get("KILN_API_KEYS", "").split(",") if entry.strip()]
        keys = []
        for entry in entries:
            tenant, _, key = entry.rpartition(":")
            if not key:
                raise ConfigError("KILN_API_KEYS: an entry has an empty key; write KEY or TENANT:KEY, "
                                  "comma-separated")
            keys.append((tenant or DEFAULT_TENANT, key))
        return cls(tuple(keys))

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def tenant(self, headers: Mapping[str, str]) -> str | None:
        """The tenant whose key the request presents (lower-case header names); None when
        authentication is off. Raises Unauthenticated without a key, PermissionDenied for a wrong one."""
        if not self.keys:
            return None
        presented = _presented_key(headers)
        if presented is None:
            raise Unauthenticated("this server requires an API key: send 'Authorization: Bearer KEY' "
                                  "or 'X-API-Key: KEY'")
        tenant = None
        for candidate, key in self.keys:  # compare with every key, in constant time
            if hmac.compare_digest(presented.encode(), key.encode()):
                tenant = candidate
        if tenant is None:
            raise PermissionDenied("the API key is not valid for this server")
        return tenant


def _presented_key(headers: Mapping[str, str]) -> str | None:
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = headers.get("x-api-key", "").strip()
    return key or None


@dataclass(frozen=True)
class Cors:
    """The origins browsers may call from: ("*",) for any; empty: CORS is off."""

    origins: tuple[str, ...] = ()

    @classmethod
    def parse(cls, value: str | None) -> Cors:
        return cls(tuple(o.strip().rstrip("/") for o in (value or "").split(",") if o.strip()))

    def allowed(self, origin: str | None) -> bool:
        return bool(origin) and ("*" in self.origins or origin in self.origins)

    def headers(self, origin: str | None) -> dict[str, str]:
        """Headers for an answer to a request from `origin` (none when it is not allowed)."""
        if not self.allowed(origin):
            return {}
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
                "Access-Control-Expose-Headers": EXPOSED_HEADERS}

    def preflight_headers(self, origin: str | None, requested_headers: str | None) -> dict[str, str]:
        """Headers for an OPTIONS preflight: the methods, the headers asked for, how long to cache."""
        if not self.allowed(origin):
            raise PermissionDenied(f"origin {origin!r} is not allowed to call this server")
        return {**self.headers(origin), "Access-Control-Allow-Methods": ALLOWED_METHODS,
                "Access-Control-Allow-Headers": requested_headers or "Authorization, Content-Type, X-API-Key",
                "Access-Control-Max-Age": PREFLIGHT_MAX_AGE}
