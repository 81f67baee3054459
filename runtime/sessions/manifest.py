"""A session's manifest: its current version and the chunks that hold that version's state.

Stored at the session's manifest key as `VERSION\\n` followed by JSON. The compare-and-set that
advances a session (runtime.sessions.backend) reads only the leading version, by the same rule as
version_of(); everything a reader needs is in the JSON, validated (runtime.record) before it is used.
"""

from __future__ import annotations

import re
from typing import Annotated

import msgspec

from runtime.record import NonEmpty, NonNegative, Positive, Record, problem
from runtime.sessions.encoding import FormatError
from runtime.sessions.keys import SessionKeys

_VERSION = re.compile(rb"(\d+)\n")


def version_of(value: bytes | None) -> int:
    """The version a stored manifest value starts with; 0 for none, or for one that does not start
    with a version (so a new save may replace a manifest that is unreadable)."""
    match = _VERSION.match(value or b"")
    return int(match[1]) if match else 0


class TensorEntry(Record, frozen=True):
    name: NonEmpty
    chunks: NonNegative  # data chunks, after the header chunk


class SessionManifest(Record, frozen=True):
    version: Positive
    write_id: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{16}$")]
    fingerprint: str
    ttl_ms: Positive
    history_ttl_ms: Positive
    history: bool  # whether a token history was saved with this version
    tensors: tuple[TensorEntry, ...]

    def value(self) -> bytes:
        return b"%d\n" % self.version + msgspec.json.encode(self)

    @classmethod
    def from_value(cls, value: bytes) -> SessionManifest:
        """The manifest in a stored value; FormatError when it is not one, or disagrees with its version."""
        version = version_of(value)
        try:
            manifest = cls.parse_json(value[value.index(b"\n") + 1 :])
        except ValueError as e:  # no newline, or msgspec's DecodeError (a ValueError; Invalid among them)
            raise FormatError(f"the session manifest is unreadable: {problem(e)}") from None
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
