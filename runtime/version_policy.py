"""Which versions of a model to serve, and the next step towards serving them: TensorFlow Serving's
version policies as pure functions of a snapshot, so that tests can cover every case and a manager
only carries out what they return.

- A version policy (latest N, all, specific) picks the aspired versions among those found in
  storage, as tensorflow_serving/sources/storage_path/file_system_storage_path_source.cc does.
- `availability_preserving` is tensorflow_serving/core/availability_preserving_policy.cc (the
  model server's default AspiredVersionPolicy): it loads a new version before it unloads the old
  one, so a model that is serving keeps serving through a version change.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

import msgspec

from runtime.record import Record


class Latest(Record, frozen=True, tag_field="kind", tag="latest"):
    """The num_versions highest versions found (TF Serving's default, with num_versions 1)."""

    num_versions: int = 1

    def __post_init__(self) -> None:
        # Checked here rather than as a constraint, which msgspec applies only when parsing.
        super().__post_init__()
        if self.num_versions < 1:
            raise ValueError(f"num_versions: must be at least 1, got {self.num_versions}")


class All(Record, frozen=True, tag_field="kind", tag="all"):
    """Every version found."""


class Specific(Record, frozen=True, tag_field="kind", tag="specific"):
    """The listed versions, those of them that are found; the others are reported as missing."""

    versions: tuple[int, ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        # TF Serving accepts an empty list and then waits forever for a model that never loads.
        if not self.versions:
            raise ValueError("lists no versions; a specific policy needs at least one")
        if negative := [v for v in self.versions if v < 0]:
            raise ValueError(f"versions are numbered from 0, got {negative}")
        msgspec.structs.force_setattr(self, "versions", tuple(sorted(set(self.versions))))


VersionPolicy = Latest | All | Specific


def aspired_versions(policy: VersionPolicy, available: set[int]) -> set[int]:
    """The versions to serve among those found in storage."""
    if isinstance(policy, Latest):
        return set(sorted(available)[-policy.num_versions :])
    if isinstance(policy, All):
        return set(available)
    return available.intersection(policy.versions)


def missing_versions(policy: VersionPolicy, available: set[int]) -> set[int]:
    """Versions a specific policy asks for that storage does not have (for status and logs; TF
    Serving logs them as a warning and serves the others)."""
    return set(policy.versions) - available if isinstance(policy, Specific) else set()


class State(StrEnum):
    """A version's place in its lifecycle: TF Serving's ManagerState names (reported by
    GetModelStatus), with ERROR for a version that failed to load or to unload."""

    START = "START"
    LOADING = "LOADING"
    AVAILABLE = "AVAILABLE"
    UNLOADING = "UNLOADING"
    END = "END"
    ERROR = "ERROR"


@dataclass(frozen=True)
class VersionSnapshot:
    version: int
    state: State
    aspired: bool


@dataclass(frozen=True)
class Load:
    version: int


@dataclass(frozen=True)
class Unload:
    version: int


def availability_preserving(
    versions: Iterable[VersionSnapshot], pinned: frozenset[int] = frozenset()
) -> Load | Unload | None:
    """The next action for one model, given every version it has; None when nothing is to be done.

    As TF Serving's AvailabilityPreservingPolicy::GetNextAction:
    1. Unload the lowest non-aspired AVAILABLE version, provided that no version is aspired (the
       model is being removed), or an aspired version is AVAILABLE, or another non-aspired version
       is AVAILABLE too; so the last AVAILABLE version stays until a replacement is AVAILABLE.
       `pinned` are the versions a specific policy lists (TF Serving's GetSpecificVersionsInConfig):
       if the lowest candidate is pinned, nothing is unloaded in this step.
    2. Otherwise load the highest aspired version still in START.
    Versions LOADING or UNLOADING do not hold the policy back (a manager decides how many
    transitions run at once), and ERROR versions are never retried by it.
    """
    versions = list(versions)
    aspired = [v for v in versions if v.aspired]
    unaspired_available = sorted(v.version for v in versions if not v.aspired and v.state is State.AVAILABLE)
    if unaspired_available and (
        not aspired or len(unaspired_available) > 1 or any(v.state is State.AVAILABLE for v in aspired)
    ):
        if unaspired_available[0] not in pinned:
            return Unload(unaspired_available[0])
    new = [v.version for v in aspired if v.state is State.START]
    return Load(max(new)) if new else None
