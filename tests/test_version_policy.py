"""Version policies: which versions are aspired, and TF Serving's availability-preserving policy,
by hand-written cases (those of tensorflow_serving/core/availability_preserving_policy_test.cc) and
by every snapshot of up to three versions."""

from __future__ import annotations

import itertools

import pytest

from runtime.version_policy import (All, Latest, Load, Specific, State, Unload, VersionSnapshot,
                                    aspired_versions, availability_preserving, missing_versions)

START, LOADING, AVAILABLE, UNLOADING, END, ERROR = State


def snapshot(*versions: tuple[int, State, bool]) -> list[VersionSnapshot]:
    return [VersionSnapshot(version, state, aspired) for version, state, aspired in versions]


# --- which versions are aspired ------------------------------------------------------------------

@pytest.mark.parametrize("policy, available, aspired, missing", [
    (Latest(), {1, 2, 3}, {3}, set()),
    (Latest(num_versions=2), {1, 5, 3}, {3, 5}, set()),
    (Latest(num_versions=5), {1, 2}, {1, 2}, set()),
    (Latest(), set(), set(), set()),
    (All(), {1, 2, 7}, {1, 2, 7}, set()),
    (All(), set(), set(), set()),
    (Specific(versions=(2, 4)), {1, 2, 3}, {2}, {4}),
    (Specific(versions=(4,)), set(), set(), {4}),
    (Specific(versions=(0, 3)), {0, 3}, {0, 3}, set()),
])
def test_aspired_versions(policy, available, aspired, missing):
    assert aspired_versions(policy, available) == aspired
    assert missing_versions(policy, available) == missing


def test_specific_versions_are_sorted_distinct_and_valid():
    assert Specific(versions=(3, 1, 3)).versions == (1, 3)
    with pytest.raises(ValueError, match="lists no versions"):
        Specific(versions=())
    with pytest.raises(ValueError, match="numbered from 0"):
        Specific(versions=(-1,))
    with pytest.raises(ValueError):
        Latest(num_versions=0)


# --- TF Serving's own cases ----------------------------------------------------------------------

def test_loads_the_highest_new_aspired_version():
    versions = snapshot((1, UNLOADING, False), (2, ERROR, False), (3, AVAILABLE, True),
                        (4, START, True), (5, START, True))
    assert availability_preserving(versions) == Load(5)


def test_unloads_non_aspired_first_when_availability_is_kept():
    versions = snapshot((1, UNLOADING, False), (2, ERROR, False), (3, AVAILABLE, False),
                        (4, AVAILABLE, True), (5, START, True))
    assert availability_preserving(versions) == Unload(3)


def test_unloads_when_nothing_is_aspired():
    versions = snapshot((1, END, False), (2, AVAILABLE, False), (3, ERROR, False))
    assert availability_preserving(versions) == Unload(2)


def test_no_action_when_nothing_to_do():
    versions = snapshot((1, AVAILABLE, True), (2, ERROR, True), (3, LOADING, True),
                        (4, UNLOADING, False), (5, END, False))
    assert availability_preserving(versions) is None


def test_does_not_unload_while_the_replacement_is_loading():
    assert availability_preserving(snapshot((1, AVAILABLE, False), (2, LOADING, True))) is None


def test_does_not_unload_when_the_replacement_failed():
    assert availability_preserving(snapshot((1, AVAILABLE, False), (2, ERROR, True))) is None


def test_unloads_if_another_aspired_is_available_even_if_one_is_loading():
    versions = snapshot((1, AVAILABLE, False), (2, LOADING, True), (3, AVAILABLE, True))
    assert availability_preserving(versions) == Unload(1)


def test_unloads_if_another_aspired_is_available_even_if_one_failed():
    versions = snapshot((1, AVAILABLE, False), (2, ERROR, True), (3, AVAILABLE, True))
    assert availability_preserving(versions) == Unload(1)


def test_unloads_the_lowest_of_several_non_aspired_available():
    versions = snapshot((2, AVAILABLE, False), (1, AVAILABLE, False), (3, ERROR, True), (4, LOADING, True))
    assert availability_preserving(versions) == Unload(1)


# --- Kiln's cases --------------------------------------------------------------------------------

def test_a_pinned_version_is_not_unloaded_and_the_load_goes_ahead():
    versions = snapshot((1, AVAILABLE, False), (2, AVAILABLE, True), (3, START, True))
    assert availability_preserving(versions, pinned=frozenset({1})) == Load(3)
    assert availability_preserving(versions) == Unload(1)


def test_a_version_change_loads_the_new_one_before_unloading_the_old():
    states = {1: AVAILABLE, 2: START}
    aspired = {2}
    actions = []
    while action := availability_preserving(VersionSnapshot(v, s, v in aspired) for v, s in states.items()):
        actions.append(action)
        states[action.version] = AVAILABLE if isinstance(action, Load) else END
    assert actions == [Load(2), Unload(1)]


def test_empty_snapshot():
    assert availability_preserving([]) is None


# --- every snapshot of up to three versions ------------------------------------------------------

def all_snapshots():
    for count in range(1, 4):
        numbers = range(1, count + 1)
        for states in itertools.product(State, repeat=count):
            for aspired in itertools.product((False, True), repeat=count):
                for pins in itertools.product((False, True), repeat=count):
                    yield (snapshot(*zip(numbers, states, aspired)),
                           frozenset(v for v, pin in zip(numbers, pins) if pin))


SNAPSHOTS = list(all_snapshots())


def test_every_snapshot_satisfies_the_invariants():
    assert len(SNAPSHOTS) == 24 + 24**2 + 24**3  # (6 states x aspired x pinned) per version
    for versions, pinned in SNAPSHOTS:
        action = availability_preserving(versions, pinned)
        assert availability_preserving(reversed(versions), pinned) == action, "order matters"
        by_version = {v.version: v for v in versions}
        available = [v.version for v in versions if v.state is AVAILABLE]
        unaspired_available = sorted(v.version for v in versions if v.state is AVAILABLE and not v.aspired)
        anything_aspired = any(v.aspired for v in versions)
        # Unload exactly when the lowest non-aspired AVAILABLE version is not pinned and unloading
        # it leaves a version AVAILABLE, or nothing is aspired any more.
        unload_expected = bool(unaspired_available) and unaspired_available[0] not in pinned and (
            not anything_aspired or len(available) >= 2)
        new_aspired = [v.version for v in versions if v.aspired and v.state is START]
        if unload_expected:
            assert action == Unload(unaspired_available[0]), (versions, pinned)
        elif new_aspired:
            assert action == Load(max(new_aspired)), (versions, pinned)
        else:
            assert action is None, (versions, pinned)
        if isinstance(action, Unload):
            target = by_version[action.version]
            assert target.state is AVAILABLE and not target.aspired and action.version not in pinned
            assert not anything_aspired or len(available) >= 2, "unloaded the last available version"
        if isinstance(action, Load):
            assert by_version[action.version].state is START and by_version[action.version].aspired


@pytest.mark.parametrize("load_fails", [False, True], ids=["loads-succeed", "loads-fail"])
def test_carrying_out_the_actions_converges_without_losing_availability(load_fails):
    """A manager that completes each action at once (a load may end in ERROR) reaches a state
    where the policy has nothing to do, with no aspired version left unloaded, and a model that
    had an AVAILABLE version while versions were aspired never has none on the way."""
    for versions, pinned in SNAPSHOTS:
        states = {v.version: v.state for v in versions}
        aspired = {v.version for v in versions if v.aspired}
        had_available = AVAILABLE in states.values()
        for _ in range(2 * len(states) + 1):
            action = availability_preserving(
                [VersionSnapshot(v, s, v in aspired) for v, s in states.items()], pinned)
            if action is None:
                break
            if isinstance(action, Load):
                states[action.version] = ERROR if load_fails else AVAILABLE
            else:
                states[action.version] = END
            if had_available and aspired:
                assert AVAILABLE in states.values(), (versions, pinned, states)
        else:
            pytest.fail(f"no fixed point from {versions} pinned {set(pinned)}")
        assert not any(states[v] is START for v in aspired)
