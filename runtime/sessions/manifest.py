"""A session's manifest: its current version and the chunks that hold that version's state.

Stored at the session's manifest key as `VERSION\\n` followed by JSON. The compare-and-set that
advances a session (runtime.sessions.backend) reads only the leading version, by the same rule as
version_of(); everything a reader needs is in the JSON, validated by pydantic before it is used.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runtime.sessions.encoding import FormatError
from runtime.sessions.keys import SessionKeys

_VERSION = re.compile(rb"(\d+)\n")


def version_of(value: bytes | None) -> int:
    """The version a stored manifest value starts with; 0 for none, or for one that does not start
    with a version (so a new save may replace a manifest that is unreadable)."""
    match = _VERSION.match(value or b"")
    return int(match[1]) if match else 0


class TensorEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    chunks: int = Field(ge=0)  # data chunks, after the header chunk


class SessionManifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = Field(ge=1)
    write_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    fingerprint: str
    ttl_ms: int = Field(ge=1)
    history_ttl_ms: int = Field(ge=1)
    history: bool  # whether a token history was saved with this version
    tensors: tuple[TensorEntry, ...]

    def value(self) -> bytes:
        return b"%d\n" % self.version + self.model_dump_json().encode()

    @classmethod
    def parse(cls, value: bytes) -> SessionManifest:
        """The manifest in a stored value; FormatError when it is not one, or disagrees with its version."""
        version = version_of(value)
        try:
            manifest = cls.model_validate_json(value[value.index(b"\n") + 1 :])
        except (ValueError, ValidationError) as e:
            raise FormatError(f"the session manifest is unreadable: {_first_line(e)}") from None
        if manifest.version != version:
            raise FormatError(f"the session manifest says version {manifest.version} inside, {version} in front")
        if len({tensor.name for tensor in manifest.tensors}) != len(manifest.tensors):
            raise FormatError("the session manifest names a tensor twice")
        return manifest

    def chunk_keys(self, keys: SessionKeys) -> list[list[str]]:
        """Per tensor, in order: its header key, then its data chunk keys."""
        return [
            [keys.chunk(self.write_id, index, part) for part in range(tensor.chunks + 1)]
            for index, tensor in enumerate(self.tensors)
        ]


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__
