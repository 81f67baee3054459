"""Who may call: API-key or bearer-token authentication, and CORS for browsers.

Keys come from the environment only (KILN_API_KEYS), never from code or configuration files: a
comma-separated list of `KEY` or `TENANT:KEY` entries. A request presents one as
`Authorization: Bearer KEY` or `X-API-Key: KEY` (gRPC: the same metadata keys); the key's tenant
(`default` for a bare key) names whose data the request may touch. Without KILN_API_KEYS every
request is let in. Health and metrics endpoints stay open, so probes and scrapers need no key.

Changing what the server serves (gRPC ModelService/HandleReloadConfigRequest) is administration, not
a tenant's business: KILN_RELOAD says who may (`admin`, the default: a key of KILN_ADMIN_KEYS, in
the same format and presented the same way, never also a tenant's key; `off`: nobody; `open`:
anyone reaching the port, TF Serving's own behaviour, refused when KILN_API_KEYS is set). A reload
may name only base paths under KILN_RELOAD_BASE_PATHS (comma-separated local paths or URLs),
by default under the roots of the stores configured at start-up (the parent of each model's
base_path), so no caller can make the server load code from anywhere else. Local paths are compared
after resolving `..` and symlinks, URLs by scheme, bucket and whole `/`-separated key segments.

CORS (KILN_CORS_ORIGINS or `kiln serve --cors-origins`: `*` or a comma-separated list of origins)
answers preflights and marks answers to allowed origins; without it no CORS headers are sent and
browsers keep their same-origin rule.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from urllib.parse import unquote, urlparse

from runtime.errors import ConfigError, PermissionDenied, Unauthenticated
from runtime.storage import key_parts

DEFAULT_TENANT = "default"
DEFAULT_ADMIN = "admin"
RELOAD_POLICIES = ("admin", "off", "open")
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready", "/metrics", "/monitoring/prometheus/metrics"})
ALLOWED_METHODS = "GET, POST, DELETE, OPTIONS"
EXPOSED_HEADERS = "X-Request-Id, X-Kiln-Session, Inference-Header-Content-Length"
PREFLIGHT_MAX_AGE = "600"


@dataclass(frozen=True)
class StoreLocation:
    """Where a store's objects are, in a form that compares safely: a local path resolved (`..` and
    symlinks followed) as scheme "file", or a URL's scheme, bucket and key segments."""

    scheme: str
    bucket: str
    parts: tuple[str, ...]

    @classmethod
    def parse(cls, location: str) -> StoreLocation:
        """A local path, file://PATH, s3://BUCKET[/PREFIX] or gs://BUCKET[/PREFIX] (as runtime.storage
        opens them); ConfigError for anything else, or a key with '.', '..' or empty segments."""
        parsed = urlparse(location)
        if parsed.scheme == "" or (parsed.scheme == "file" and parsed.netloc in ("", "localhost")):
            path = unquote(parsed.path) if parsed.scheme else location
            if not path:
                raise ConfigError(f"{location!r} names no directory")
            return cls("file", "", PurePosixPath(os.path.realpath(path)).parts)
        if parsed.scheme in ("s3", "gs") and parsed.netloc:
            try:
                return cls(parsed.scheme, parsed.netloc, tuple(key_parts(parsed.path.strip("/"))))
            except ValueError as e:
                raise ConfigError(f"{location!r}: {e}") from None
        raise ConfigError(f"{location!r} is not a local path, file://, s3:// or gs:// URL")

    @property
    def parent(self) -> StoreLocation:
        """The directory or prefix holding this one; a bucket, or the local "/", is its own."""
        root = 1 if self.scheme == "file" else 0  # a local path's first part is "/"
        return StoreLocation(self.scheme, self.bucket, self.parts[:-1] if len(self.parts) > root else self.parts)

    def contains(self, other: StoreLocation) -> bool:
        """`other` is this location or under it, on whole segments (s3://b/models holds s3://b/models/x,
        not s3://b/models-evil)."""
        return (other.scheme, other.bucket) == (self.scheme, self.bucket) and other.parts[
            : len(self.parts)
        ] == self.parts

    def __str__(self) -> str:
        if self.scheme == "file":
            return str(PurePosixPath(*self.parts))
        return f"{self.scheme}://{self.bucket}/{'/'.join(self.parts)}".rstrip("/")


@dataclass(frozen=True)
class Reload:
    """Who may reload the model configuration (`policy`: admin, off or open) and which base paths a
    reload may name (`base_paths`: KILN_RELOAD_BASE_PATHS; None: the start-up stores' roots)."""

    policy: str = "admin"
    base_paths: tuple[StoreLocation, ...] | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Reload:
        policy = environ.get("KILN_RELOAD", "").strip() or "admin"
        if policy not in RELOAD_POLICIES:
            raise ConfigError(f"KILN_RELOAD must be one of {', '.join(RELOAD_POLICIES)}, got {policy!r}")
        entries = [entry.strip() for entry in environ.get("KILN_RELOAD_BASE_PATHS", "").split(",") if entry.strip()]
        try:
            base_paths = tuple(StoreLocation.parse(entry) for entry in entries) or None
        except ConfigError as e:
            raise ConfigError(f"KILN_RELOAD_BASE_PATHS: {e}") from None
        return cls(policy, base_paths)

    def roots(self, configured: Iterable[str]) -> tuple[StoreLocation, ...]:
        """The roots a reload may name: KILN_RELOAD_BASE_PATHS, else the parent of each base path in
        `configured` (the configuration at start-up, before any reload could widen it)."""
        if self.base_paths is not None:
            return self.base_paths
        return tuple(dict.fromkeys(StoreLocation.parse(base_path).parent for base_path in configured))

    @staticmethod
    def check_base_paths(base_paths: Iterable[str], roots: tuple[StoreLocation, ...]) -> None:
        """PermissionDenied naming the first base path outside every root, and the roots."""
        for base_path in base_paths:
            location = StoreLocation.parse(base_path)
            if not any(root.contains(location) for root in roots):
                allowed = ", ".join(str(root) for root in roots) or "none"
                raise PermissionDenied(
                    f"base_path {base_path!r} is outside the roots a reload may name ({allowed}); "
                    f"KILN_RELOAD_BASE_PATHS sets them"
                )


@dataclass(frozen=True)
class Auth:
    """The accepted keys: tenants' (empty: authentication is off) and administrators', each with its
    name, and the reload policy."""

    keys: tuple[tuple[str, str], ...] = ()
    admin_keys: tuple[tuple[str, str], ...] = ()
    reload: Reload = field(default_factory=Reload)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Auth:
        """From KILN_API_KEYS, KILN_ADMIN_KEYS, KILN_RELOAD and KILN_RELOAD_BASE_PATHS; `check` says
        whether they fit together."""
        return cls(
            _keys(environ, "KILN_API_KEYS", "TENANT", DEFAULT_TENANT),
            _keys(environ, "KILN_ADMIN_KEYS", "NAME", DEFAULT_ADMIN),
            Reload.from_env(environ),
        )

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def check(self) -> None:
        """ConfigError for settings that cannot work together (it names entries, never keys)."""
        tenants = {key: tenant for tenant, key in self.keys}
        for admin, key in self.admin_keys:
            if key in tenants:
                raise ConfigError(
                    f"KILN_ADMIN_KEYS: the key of {admin!r} is also tenant {tenants[key]!r}'s key in "
                    f"KILN_API_KEYS; an administrator's key must be its own"
                )
        if self.reload.policy == "open" and self.keys:
            raise ConfigError(
                "KILN_RELOAD=open lets anyone reaching the port reload the model configuration, but "
                "KILN_API_KEYS is set, so callers are tenants: use KILN_RELOAD=admin (the default) "
                "with KILN_ADMIN_KEYS, or KILN_RELOAD=off"
            )
        if self.reload.policy == "open" and self.admin_keys:
            raise ConfigError(
                "KILN_ADMIN_KEYS is set but KILN_RELOAD=open needs no key to reload: use "
                "KILN_RELOAD=admin (the default)"
            )

    def tenant(self, headers: Mapping[str, str]) -> str | None:
        """The tenant whose key the request presents (lower-case header names); None when
        authentication is off. Raises Unauthenticated without a key, PermissionDenied for a wrong one."""
        if not self.keys:
            return None
        presented = _required_key(headers, "this server requires an API key")
        tenant = _owner(presented, self.keys)
        if tenant is None:
            if _owner(presented, self.admin_keys) is not None:
                raise PermissionDenied(
                    "an administrator's key (KILN_ADMIN_KEYS) is for administration only; "
                    "requests for models need a tenant's key (KILN_API_KEYS)"
                )
            raise PermissionDenied("the API key is not valid for this server")
        return tenant

    def admin(self, headers: Mapping[str, str]) -> str | None:
        """Who may reload the model configuration: the administrator whose key the request presents
        (None under KILN_RELOAD=open). Raises PermissionDenied when reload is off, or needs a key this
        server has none of, or the key is not an administrator's; Unauthenticated without a key."""
        if self.reload.policy == "open":
            return None
        if self.reload.policy == "off":
            raise PermissionDenied("reloading the model configuration is off on this server (KILN_RELOAD=off)")
        if not self.admin_keys:
            raise PermissionDenied(
                "reloading the model configuration needs an administrator's key and this server "
                "has none: set KILN_ADMIN_KEYS (NAME:KEY, comma-separated, not tenants' keys) "
                "and present one as 'Authorization: Bearer KEY'; or, without KILN_API_KEYS, "
                "KILN_RELOAD=open lets anyone reaching the port reload, as TF Serving does"
            )
        presented = _required_key(headers, "reloading the model configuration needs an administrator's key")
        admin = _owner(presented, self.admin_keys)
        if admin is None:
            raise PermissionDenied(
                "reloading the model configuration needs an administrator's key (KILN_ADMIN_KEYS); "
                "the key presented is not one"
            )
        return admin


def _keys(environ: Mapping[str, str], variable: str, owner: str, default: str) -> tuple[tuple[str, str], ...]:
    """(owner, key) pairs from a comma-separated list of `KEY` or `OWNER:KEY` entries."""
    entries = [entry.strip() for entry in environ.get(variable, "").split(",") if entry.strip()]
    keys = []
    for entry in entries:
        name, _, key = entry.rpartition(":")
        if not key:
            raise ConfigError(f"{variable}: an entry has an empty key; write KEY or {owner}:KEY, comma-separated")
        keys.append((name or default, key))
    return tuple(keys)


def _owner(presented: str, keys: tuple[tuple[str, str], ...]) -> str | None:
    """The name whose key was presented, comparing with every key in constant time."""
    owner = None
    for name, key in keys:
        if hmac.compare_digest(presented.encode(), key.encode()):
            owner = name
    return owner


def _required_key(headers: Mapping[str, str], needed: str) -> str:
    """The key the request presents; Unauthenticated, saying what needs one and how to send it, without."""
    presented = _presented_key(headers)
    if presented is None:
        raise Unauthenticated(f"{needed}: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")
    return presented


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
        if origin is None or not self.allowed(origin):
            return {}
        return {
            "Access-Control-Allow-Origin": origin,
            "Vary": "Origin",
            "Access-Control-Expose-Headers": EXPOSED_HEADERS,
        }

    def preflight_headers(self, origin: str | None, requested_headers: str | None) -> dict[str, str]:
        """Headers for an OPTIONS preflight: the methods, the headers asked for, how long to cache."""
        if not self.allowed(origin):
            raise PermissionDenied(f"origin {origin!r} is not allowed to call this server")
        return {
            **self.headers(origin),
            "Access-Control-Allow-Methods": ALLOWED_METHODS,
            "Access-Control-Allow-Headers": requested_headers or "Authorization, Content-Type, X-API-Key",
            "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
        }
