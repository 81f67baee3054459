"""A stateful signature's declarations (kiln compile's --state, --state-capacity, --state-append):
read from the command line, then checked against the signatures and recorded on them
(runtime/manifest.py has the rules)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace

from runtime.compiler.savedmodel import SignatureInfo
from runtime.errors import CompileError
from runtime.manifest import Position, state_problems


def declare_state(
    infos: dict[str, SignatureInfo],
    state: Mapping[str, Mapping[str, str]],
    positions: Mapping[str, tuple[str, int | str]],
    appended: Mapping[str, Sequence[str]],
) -> dict[str, SignatureInfo]:
    """The signatures with the state declared for them, checked against them before anything compiles."""
    for option, named in (("--state", state), ("--state-capacity", positions), ("--state-append", appended)):
        unknown = [key for key in named if key not in infos]
        if unknown:
            raise CompileError(
                f"{option} names signature(s) {', '.join(unknown)}, which are not compiled; "
                f"the signatures are {', '.join(infos)}"
            )
    checked: dict[str, Position] = {}
    for key, (name, capacity) in positions.items():
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise CompileError(
                f"--state-capacity for {key}:{name} must be a positive number of tokens, got {capacity!r}"
            )
        checked[key] = Position(input=name, capacity=capacity)
    declared = {
        key: replace(
            info,
            state=dict(state.get(key, {})),
            position=checked.get(key),
            appended=tuple(appended.get(key, ())),
        )
        for key, info in infos.items()
    }
    problems = state_problems(declared)
    if problems:
        raise CompileError("the state declared does not fit the signatures: " + "; ".join(problems))
    return declared


def parse_state(text: str) -> dict[str, dict[str, str]]:
    """`kiln compile --state SIGNATURE:INPUT=OUTPUT[,...]` as {signature: {input: output}}."""
    state: dict[str, dict[str, str]] = {}
    for key, name, output in _declarations(text, "--state", "SIGNATURE:INPUT=OUTPUT"):
        if name in state.setdefault(key, {}):
            raise CompileError(f"--state pairs input '{name}' of signature '{key}' twice")
        state[key][name] = output
    return state


def parse_capacities(text: str) -> dict[str, tuple[str, int | str]]:
    """`kiln compile --state-capacity SIGNATURE:INPUT=TOKENS[,...]` as {signature: (input, tokens)}."""
    positions: dict[str, tuple[str, int | str]] = {}
    for key, name, tokens in _declarations(text, "--state-capacity", "SIGNATURE:INPUT=TOKENS"):
        if key in positions:
            raise CompileError(f"--state-capacity names two positions for signature '{key}'")
        positions[key] = (name, int(tokens) if tokens.isdigit() else tokens)  # compile_servable checks it
    return positions


def parse_appended(text: str) -> dict[str, list[str]]:
    """`kiln compile --state-append SIGNATURE:INPUT[,...]` as {signature: [input]}."""
    appended: dict[str, list[str]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, colon, name = item.rpartition(":")
        if not (colon and key.strip() and name.strip()):
            raise CompileError(f"--state-append takes SIGNATURE:INPUT[,...]; '{item}' is not of that form")
        appended.setdefault(key.strip(), []).append(name.strip())
    return appended


def _declarations(text: str, option: str, form: str) -> Iterator[tuple[str, str, str]]:
    """(signature, input, value) for each comma-separated SIGNATURE:INPUT=VALUE."""
    for item in filter(None, (part.strip() for part in text.split(","))):
        head, equals, value = item.partition("=")
        key, colon, name = head.rpartition(":")
        if not (equals and colon and key.strip() and name.strip() and value.strip()):
            raise CompileError(f"{option} takes {form}[,...]; '{item}' is not of that form")
        yield key.strip(), name.strip(), value.strip()
