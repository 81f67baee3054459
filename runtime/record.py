"""Frozen, validated records: what Kiln reads from manifests, configurations, stores and events.

msgspec, not pydantic: importing pydantic and building these schemas was about 110 ms of every cold
start (python -X importtime, load/import_floor.py), a third of a small servable's process-to-first-
prediction; msgspec imports in about 10 ms and checks types, constraints and unknown fields while it
converts. A record's own rules (between fields) are its `__post_init__`, which runs both when it is
constructed and when it is parsed; constraints on one field (Positive, NonEmpty, msgspec.Meta) are
checked when parsing only, what Kiln builds itself being checked where it is made.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Self

import msgspec

Invalid = msgspec.ValidationError  # a ValueError
Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
_LOCATION = re.compile(r"^(?P<what>.*?)(?: - at `(?:key` in `)?\$\.?(?P<where>[^`]*)`)?$", re.S)
# msgspec names an unknown or missing field in its message, at the enclosing object's path.
_FIELD = re.compile(r"^Object (?:(?P<unknown>contains unknown)|missing required) field `(?P<field>[^`]*)`$")


class Record(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    def __post_init__(self) -> None:
        """Lists given to the constructor become tuples, as parsing makes them (every sequence field
        of a record is a tuple, so records compare and hash alike however they were made)."""
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if isinstance(value, list):
                msgspec.structs.force_setattr(self, name, tuple(value))

    @classmethod
    def parse(cls, data: Any) -> Self:
        """The record in decoded JSON or YAML, checked; Invalid says what is wrong and where."""
        return msgspec.convert(data, cls, strict=False)

    @classmethod
    def parse_json(cls, data: bytes) -> Self:
        return msgspec.json.decode(data, type=cls)

    def replace(self, **changes: Any) -> Self:
        """A copy with some fields changed (not re-checked, as a dataclass's replace)."""
        return msgspec.structs.replace(self, **changes)

    def to_builtins(self) -> dict[str, Any]:
        """The record as JSON's types (mapping keys as strings)."""
        return msgspec.to_builtins(self, str_keys=True)


def problem(error: ValueError) -> str:
    """An error from parsing or constructing a record as 'field.path: what is wrong'."""
    match = _LOCATION.match(str(error))
    what, where = (match["what"], match["where"]) if match else (str(error), None)
    if field := _FIELD.match(what):
        where = f"{where}.{field['field']}" if where else field["field"]
        what = "is not a known field" if field["unknown"] else "is required"
    return f"{where}: {what}" if where else what
