"""Session ids: unguessable, and bound to the tenant they were issued to.

An id is 16 random bytes and a 16-byte HMAC-SHA256 tag over (tenant, random), base64url without
padding: 43 characters. Only the holder of the key can make an id that checks; an id issued to one
tenant never checks for another, so a tenant cannot name, read or overwrite another's session even
when it learns the id. Checking needs no store and compares in constant time.

The key comes from the environment only: KILN_SESSION_KEY, hex or base64, at least 32 bytes. Every
instance serving the same sessions needs the same key. Several keys, comma-separated, rotate: the
first issues ids, every one is accepted. With a store that instances share (KILN_REDIS_URL) it is
required: a key made per instance would make every other instance refuse its sessions, silently, so
the server refuses to start instead. With the in-process store, a random key is made per process
(with a warning): sessions then do not survive a restart, and never move between instances anyway.

An id has exactly one spelling (its base64url alphabet, canonical padding bits), and the tenant is
checked against runtime.sessions.keys' safe character set before it is signed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import secrets
from collections.abc import Mapping, Sequence

from runtime.errors import ConfigError, InvalidInput, PermissionDenied
from runtime.sessions.keys import check_tenant, checked, shown

KEY_VARIABLE = "KILN_SESSION_KEY"
MIN_KEY_BYTES = 32
RANDOM_BYTES = 16
TAG_BYTES = 16
ID_LENGTH = 43  # base64url of RANDOM_BYTES + TAG_BYTES, unpadded
_ID = re.compile(rf"[A-Za-z0-9_\-]{{{ID_LENGTH}}}")
_DOMAIN = b"kiln-session-id-v1\0"

log = logging.getLogger(__name__)


def check_id_form(session_id: str) -> str:
    """`session_id` if it has the form of a session id, else InvalidInput (says nothing of its tag)."""
    return checked(session_id, _ID, f"a session id: expected the {ID_LENGTH} characters (base64url) this server issued")


class SessionIds:
    """Issues session ids and checks that an id was issued to a tenant."""

    def __init__(self, keys: Sequence[bytes]):
        if not keys:
            raise ConfigError("session ids need at least one key")
        for key in keys:
            if len(key) < MIN_KEY_BYTES:
                raise ConfigError(f"a session key must be at least {MIN_KEY_BYTES} bytes, got {len(key)}")
        self.keys = tuple(keys)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, *, shared: bool = False) -> SessionIds:
        """Keys from KILN_SESSION_KEY. When it is not set: for a store instances share (`shared`), a
        ConfigError; otherwise a random per-process key, with a warning."""
        value = environ.get(KEY_VARIABLE, "").strip()
        if not value and shared:
            raise ConfigError(
                f"{KEY_VARIABLE} is not set, but sessions are in a shared store (KILN_REDIS_URL): "
                f"every instance must sign session ids with the same key, or each refuses the "
                f"others' sessions. Make one (at least {MIN_KEY_BYTES} bytes, hex or base64), e.g. "
                f'`python -c "import secrets; print(secrets.token_hex(32))"`, keep it as a secret, '
                f"and set {KEY_VARIABLE} to it on every instance"
            )
        if not value:
            log.warning(
                "%s is not set: session ids use a random key of this process, so sessions do not "
                "survive a restart or move to another instance; set it (64 hex digits, e.g. from "
                "`openssl rand -hex 32`) to the same value on every instance",
                KEY_VARIABLE,
            )
            return cls([secrets.token_bytes(MIN_KEY_BYTES)])
        return cls([parse_key(part.strip()) for part in value.split(",") if part.strip()])

    def new(self, tenant: str) -> str:
        """A fresh session id for `tenant`."""
        random = secrets.token_bytes(RANDOM_BYTES)
        return base64.urlsafe_b64encode(random + self._tag(self.keys[0], tenant, random)).rstrip(b"=").decode()

    def check(self, tenant: str, session_id: str) -> str:
        """`session_id` if it was issued to `tenant` under one of the keys. Raises InvalidInput for
        what is not a session id, PermissionDenied for one issued to another tenant, under another
        key, or made up."""
        check_tenant(tenant)
        raw = base64.urlsafe_b64decode(check_id_form(session_id) + "=")
        if base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != session_id:  # one spelling per id
            raise InvalidInput(f"{shown(session_id)} is not a session id this server issued")
        random, tag = raw[:RANDOM_BYTES], raw[RANDOM_BYTES:]
        valid = False
        for key in self.keys:  # every key, each compared in constant time
            valid |= hmac.compare_digest(self._tag(key, tenant, random), tag)
        if not valid:
            raise PermissionDenied(
                "this session id was not issued to this tenant by this server (or under a key "
                "it no longer has); start a new session"
            )
        return session_id

    @staticmethod
    def _tag(key: bytes, tenant: str, random: bytes) -> bytes:
        message = _DOMAIN + check_tenant(tenant).encode() + b"\0" + random
        return hmac.new(key, message, hashlib.sha256).digest()[:TAG_BYTES]


def parse_key(text: str) -> bytes:
    """A key written as hex or base64 (standard or URL-safe); ConfigError names the variable."""
    try:
        key = (
            bytes.fromhex(text)
            if re.fullmatch(r"(?:[0-9a-fA-F]{2})+", text)
            else base64.b64decode(text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4), validate=True)
        )
    except (ValueError, binascii.Error):
        raise ConfigError(f"{KEY_VARIABLE} must be hex or base64, comma-separated for several keys") from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"{KEY_VARIABLE}: a key must be at least {MIN_KEY_BYTES} bytes, got {len(key)} "
            f"(e.g. `openssl rand -hex 32`)"
        )
    return key
