"""Prebuilds the saved-model engine's persistent XLA cache. Run as a module in a fresh process:
`python -m runtime.compiler.xla_cache SERVABLE_DIR` prints {signature: compiled_with_xla} as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from runtime.engines.base import synthetic_inputs
from runtime.engines.saved_model import SavedModelRunner
from runtime.manifest import read_manifest


def prebuild(directory: Path) -> dict[str, bool]:
    manifest = read_manifest(directory)
    jit = {}
    for key, signature in manifest.signatures.items():
        if signature.engine != "saved-model":
            continue
        if any(spec.shape is None or None in spec.shape[1 if signature.batched else 0 :] for spec in signature.inputs):
            jit[key] = False  # every new inner shape would compile again: run it as a graph
            continue
        runner = SavedModelRunner(directory, key, signature.replace(jit=True), writable_cache=True)
        try:
            for bucket in manifest.batch_sizes if signature.batched else (0,):
                runner.run(synthetic_inputs(signature, bucket), bucket)
            jit[key] = True
        except Exception:  # XLA cannot compile it (string ops, tables): it runs as a graph
            jit[key] = False
    return jit


if __name__ == "__main__":
    print(json.dumps(prebuild(Path(sys.argv[1]))))
