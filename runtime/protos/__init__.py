"""Kiln's .proto files, with TensorFlow Serving's packages, message names and field numbers, and the
one way runtime code reaches the modules generated from them at build time (runtime.protos.build)."""

from __future__ import annotations

import importlib
from typing import Any

_GENERATED = f"{__name__}.generated"


def generated_module(module: str) -> Any:  # its classes are made at import: no static types
    """A generated module by its path under the .proto tree, such as
    "tensorflow_serving.config.model_server_config_pb2", with a clear error if the build step has
    not run (the modules are build outputs, not sources)."""
    try:
        return importlib.import_module(f"{_GENERATED}.{module}")
    except ModuleNotFoundError as e:
        if e.name is None or not e.name.startswith(_GENERATED):
            raise
        raise ModuleNotFoundError(
            f"the protobuf module {module} has not been generated: run `python -m runtime.protos.build` (make setup)",
            name=e.name,
        ) from None
