"""Batching parameters: TensorFlow Serving's names and defaults, plus Kiln's batching mode.

Sources, later ones overriding earlier ones field by field: the defaults; TF Serving's
--batching_parameters_file (its BatchingParameters message in protobuf text format, or the same
fields in YAML or JSON); `kiln serve` flags; a model's own `batching_parameters` in a YAML or JSON
model config (the text models.config has no place for them, as in TF Serving).

Modes: `adaptive` (the default of `kiln serve`) learns each bucket's execution time and the arrival
rate and waits for more requests only while that pays off, never past batch_timeout_micros;
`fixed` is TF Serving's rule (a batch goes when full or when its oldest request has waited
batch_timeout_micros); `off` runs every request alone, with no queue.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import msgspec

from runtime.errors import ConfigError
from runtime.record import NonNegative, Positive, Record, problem

Mode = Literal["adaptive", "fixed", "off"]
# Adaptive mode's ceiling on waiting when none is configured (TF Serving's default, 0, would
# forbid waiting at all): short against a request's round trip, long against one execution.
ADAPTIVE_DEFAULT_TIMEOUT_MICROS = 2000


class BatchingParameters(Record, frozen=True):
    mode: Mode = "adaptive"
    max_batch_size: Positive = 1000
    batch_timeout_micros: NonNegative | None = None  # None: 0, or adaptive's own ceiling
    max_enqueued_batches: Positive = 10
    num_batch_threads: Positive = msgspec.field(default_factory=lambda: len(os.sched_getaffinity(0)))
    allowed_batch_sizes: tuple[int, ...] = ()
    pad_variable_length_inputs: bool = False
    # TF Serving refuses a request larger than max_batch_size; with this it is split instead.
    enable_large_batch_splitting: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        sizes = self.allowed_batch_sizes
        if sizes:
            if any(b <= a for a, b in zip(sizes, sizes[1:])) or sizes[0] < 1:
                raise ValueError(f"allowed_batch_sizes must be positive and increasing, got {list(sizes)}")
            if sizes[-1] != self.max_batch_size:
                raise ValueError(
                    f"the last of allowed_batch_sizes ({sizes[-1]}) must equal max_batch_size ({self.max_batch_size})"
                )

    @property
    def timeout_seconds(self) -> float:
        if self.batch_timeout_micros is not None:
            return self.batch_timeout_micros / 1e6
        return ADAPTIVE_DEFAULT_TIMEOUT_MICROS / 1e6 if self.mode == "adaptive" else 0.0

    def merged(self, overrides: dict[str, Any], source: str) -> BatchingParameters:
        """These parameters with some fields replaced; a ConfigError names the source and the field."""
        return parse({**self.to_builtins(), **overrides}, source)


def server_parameters(file: str | None, flags: dict[str, Any]) -> BatchingParameters:
    """The server's parameters: the defaults, then the file's, then the flags given (not None)."""
    base = load_batching_parameters(file) if file else BatchingParameters()
    given = {name: value for name, value in flags.items() if value is not None}
    return base.merged(given, "batching flags") if given else base


def parse(fields: dict[str, Any], source: str) -> BatchingParameters:
    try:
        return BatchingParameters.parse(fields)
    except ValueError as e:  # Invalid, with __post_init__'s own errors among them
        raise ConfigError(f"{source}: {problem(e)}") from None


def load_batching_parameters(path: str | Path) -> BatchingParameters:
    """TF Serving's batching parameters file: text format (`max_batch_size { value: 32 }`), or YAML
    or JSON (`max_batch_size: 32`) by extension."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read the batching parameters file {path}: {e.strerror}") from None
    if path.suffix in (".yaml", ".yml", ".json"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML or JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of batching parameters")
        return parse(data, str(path))
    return parse(_from_text(text, str(path)), str(path))


def _from_text(text: str, source: str) -> dict[str, Any]:
    from google.protobuf import text_format

    from runtime.protos import generated_module

    message = generated_module("kiln.batching_pb2").BatchingParameters()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        raise ConfigError(f"{source}:{e}") from None
    fields: dict[str, Any] = {}
    for name in (
        "max_batch_size",
        "batch_timeout_micros",
        "max_enqueued_batches",
        "num_batch_threads",
        "enable_large_batch_splitting",
    ):
        if message.HasField(name):
            fields[name] = getattr(message, name).value
    if message.allowed_batch_sizes:
        fields["allowed_batch_sizes"] = tuple(message.allowed_batch_sizes)
    if message.pad_variable_length_inputs:
        fields["pad_variable_length_inputs"] = True
    return fields


class BatchingPolicy:
    """Each model's batching parameters: the server's, with the model's own (from its config) on
    top; computed once per model and configuration, not per request."""

    def __init__(self, server: BatchingParameters, model_overrides: Callable[[str], dict[str, Any]]):
        self.server = server
        self.model_overrides = model_overrides
        self._cache: dict[tuple[str, str], BatchingParameters] = {}

    def __call__(self, name: str) -> BatchingParameters:
        overrides = self.model_overrides(name)
        if not overrides:
            return self.server
        key = (name, repr(sorted(overrides.items())))
        if key not in self._cache:
            self._cache[key] = self.server.merged(overrides, f"batching_parameters of model {name!r}")
        return self._cache[key]
