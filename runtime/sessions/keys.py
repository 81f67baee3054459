"""Where things live in the store, and what may go into a key name.

Every key of one session carries the hash tag {TENANT:SESSION}, so a Redis or Valkey cluster keeps
the whole session on one shard (the compare-and-set script touches several of its keys at once):

    kiln:{TENANT:SESSION}:manifest                          the current version and what it points to
    kiln:{TENANT:SESSION}:history                           the token history (runtime.sessions.encoding, inline)
    kiln:{TENANT:SESSION}:chunk:WRITE:TENSOR:PART           PART 0 the tensor's header, 1.. its data

WRITE is a random id per save, so two writers never share a chunk key. Prediction cache entries
are spread over the cluster (no hash tag): kiln:prediction:TENANT:DIGEST.

Tenants and session ids are checked against a safe character set before they become part of a key,
so nothing a client sends can reach a key outside its own namespace.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from runtime.errors import InvalidInput

PREFIX = "kiln"
TENANT = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
SESSION = re.compile(r"[A-Za-z0-9_\-]{1,128}")


def check_tenant(tenant: str) -> str:
    """`tenant` if it is a valid tenant name (letters, digits, '_', '.', '-'; 1 to 64), else InvalidInput."""
    return checked(tenant, TENANT, "a valid tenant name: expected 1 to 64 letters, digits, '_', '.' or '-'")


def check_session(session_id: str) -> str:
    """`session_id` if it can name a session in the store (letters, digits, '_', '-'; 1 to 128)."""
    return checked(session_id, SESSION, "a valid session id: expected 1 to 128 letters, digits, '_' or '-'")


def checked(value: str, pattern: re.Pattern, what: str) -> str:
    """`value` if it is a string all of which `pattern` matches, else InvalidInput: "VALUE is not WHAT"."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidInput(f"{shown(value)} is not {what}")
    return value


@dataclass(frozen=True)
class SessionKeys:
    """The keys of one tenant's session."""

    tenant: str
    session_id: str

    def __post_init__(self):
        check_tenant(self.tenant)
        check_session(self.session_id)

    @property
    def base(self) -> str:
        return f"{PREFIX}:{{{self.tenant}:{self.session_id}}}"

    @property
    def manifest(self) -> str:
        return f"{self.base}:manifest"

    @property
    def history(self) -> str:
        return f"{self.base}:history"

    def chunk(self, write_id: str, tensor: int, part: int) -> str:
        return f"{self.base}:chunk:{write_id}:{tensor}:{part}"


def prediction_key(tenant: str, digest: str) -> str:
    return f"{PREFIX}:prediction:{check_tenant(tenant)}:{digest}"


def shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
