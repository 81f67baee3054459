"""A loaded servable: checks its inputs, splits batches into buckets, runs each signature's runner.

Each signature has a Runner from the engine that compiled it (xla-aot or saved-model). Runners see
only valid inputs of at most one bucket's rows and pad them themselves, which lets the xla-aot
runner write straight into the compiled code's argument buffers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from runtime.buckets import plan_chunks
from runtime.cpu import check_target, host_architecture
from runtime.errors import InvalidInput
from runtime.manifest import Manifest, Signature, TensorSpec, read_manifest, show_shape, verify_files


class Runner(Protocol):
    def run(self, inputs: dict[str, np.ndarray], bucket: int) -> dict[str, np.ndarray]:
        """Run on inputs of n <= bucket rows (all rows for an unbatched signature); return n rows."""

    def close(self) -> None: ...


class Engine:
    """A servable ready to run; safe to call from several threads at once."""

    def __init__(self, directory: Path, manifest: Manifest, runners: dict[str, Runner]):
        self.directory = directory
        self.manifest = manifest
        self._runners = runners

    @classmethod
    def open(cls, directory: Path, *, verify: bool = True, threads: int | None = None) -> Engine:
        manifest = read_manifest(directory).for_architecture(host_architecture())  # its build for this machine
        if any(sig.engine == "xla-aot" for sig in manifest.signatures.values()):
            from runtime.engines.xla_aot import preload_framework_library

            preload_framework_library()  # its dlopen overlaps the checksums
        if verify:
            verify_files(directory, manifest)
        runners: dict[str, Runner] = {}
        if manifest.runtime:
            from runtime import runtime_library

            # Not on a CPU that lacks the target's features: its static initializers could use them.
            check_target(manifest.target.triple, manifest.target.cpu, list(manifest.target.features))
            runtime_library.load(directory, manifest.runtime)  # before the bucket libraries that need it
        if manifest.weights:
            from runtime.engines.xla_aot import check_elf

            check_elf(directory / manifest.weights)  # the bucket libraries load it: it must be whole
        try:
            for key, signature in manifest.signatures.items():
                if signature.engine == "xla-aot":
                    check_target(manifest.target.triple, manifest.target.cpu, list(manifest.target.features))
                    from runtime.engines.xla_aot import AotRunner

                    # Signatures compiled once (Keras's serve and serving_default) share one runner.
                    same = next(
                        (
                            runners[other]
                            for other, seen in manifest.signatures.items()
                            if other in runners and seen.engine == "xla-aot" and seen.libraries == signature.libraries
                        ),
                        None,
                    )
                    if same is None and signature.host is not None:
                        from runtime.host_program import FrontedRunner, HostFront

                        same = FrontedRunner(
                            HostFront(directory, signature.host), AotRunner(directory, signature.compiled(), threads)
                        )
                    runners[key] = same or AotRunner(directory, signature, threads)
                else:
                    from runtime.engines.saved_model import SavedModelRunner

                    runners[key] = SavedModelRunner(directory, key, signature)
        except BaseException:
            for runner in runners.values():
                runner.close()
            raise
        return cls(directory, manifest, runners)

    @property
    def signatures(self) -> dict[str, Signature]:
        return self.manifest.signatures

    def signature(self, key: str) -> Signature:
        try:
            return self.manifest.signatures[key]
        except KeyError:
            known = ", ".join(sorted(self.manifest.signatures))
            raise InvalidInput(f"signature '{key}' not found in model {self.manifest.name}; it has: {known}") from None

    def run(self, key: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name for inputs by name; batched signatures take any number of rows, and
        elementwise ones inputs of any shape (their outputs take that shape)."""
        signature = self.signature(key)
        arrays, rows = check_inputs(signature, inputs)
        if signature.elementwise:
            shape = next(iter(arrays.values())).shape
            flat = self.run_elements(key, {name: array.reshape(-1) for name, array in arrays.items()})
            return {name: array.reshape(shape) for name, array in flat.items()}
        return self._run_rows(key, arrays, rows)

    def run_elements(self, key: str, runs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """An elementwise signature's outputs for runs of elements (vectors of one length, checked
        by check_inputs before they were flattened): how the batcher merges such requests."""
        elements = len(next(iter(runs.values())))
        if elements == 0:
            return {spec.name: np.zeros(0, spec.dtype) for spec in self.signature(key).outputs}
        return self._run_rows(key, runs, elements)

    def _run_rows(self, key: str, arrays: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
        """Run checked inputs, split into and padded to the buckets when the signature is batched."""
        runner = self._runners[key]
        if not self.manifest.signatures[key].batched:
            return runner.run(arrays, 0)
        chunks = plan_chunks(rows, self.manifest.batch_sizes)
        if len(chunks) == 1:
            return runner.run(arrays, chunks[0][2])
        parts = [runner.run({n: a[start:stop] for n, a in arrays.items()}, bucket) for start, stop, bucket in chunks]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def close(self) -> None:
        for runner in {id(runner): runner for runner in self._runners.values()}.values():
            runner.close()
        self._runners = {}


def check_inputs(signature: Signature, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """Inputs as arrays of the signature's dtypes, and the batch size (the number of elements for
    an elementwise signature, whose inputs must share one shape); one clear error otherwise."""
    expected = {spec.name for spec in signature.inputs}
    missing, unknown = sorted(expected - set(inputs)), sorted(set(inputs) - expected)
    if missing or unknown:
        parts = [
            f"missing input(s) {', '.join(missing)}" if missing else "",
            f"unknown input(s) {', '.join(unknown)}" if unknown else "",
        ]
        raise InvalidInput(f"{'; '.join(p for p in parts if p)}; the signature takes {', '.join(sorted(expected))}")
    arrays = {spec.name: _as_dtype(spec, inputs[spec.name]) for spec in signature.inputs}
    rows = 0
    for spec in signature.inputs:
        array = arrays[spec.name]
        if not _shape_fits(spec.shape, array.shape):
            raise InvalidInput(
                f"input '{spec.name}' must have shape {show_shape(spec.shape)}, got {show_shape(array.shape)}"
            )
    if signature.elementwise:
        shapes = {name: array.shape for name, array in arrays.items()}
        if len(set(shapes.values())) > 1:
            raise InvalidInput(
                "the inputs of an elementwise signature must have one shape (they are not "
                "broadcast), got " + ", ".join(f"{n} {show_shape(s)}" for n, s in shapes.items())
            )
        rows = next(iter(arrays.values())).size
    elif signature.batched:
        sizes = {spec.name: arrays[spec.name].shape[0] for spec in signature.inputs}
        rows = next(iter(sizes.values()))
        if len(set(sizes.values())) > 1:
            raise InvalidInput(f"inputs must have the same batch size (dimension 0), got {sizes}")
        if rows == 0:
            raise InvalidInput("the batch is empty: dimension 0 of the inputs is 0")
    return arrays, rows


def _as_dtype(spec: TensorSpec, value) -> np.ndarray:
    array = np.asarray(value)
    if spec.dtype == "string":
        if array.dtype.kind in "SU":
            return array.astype(object)
        if array.dtype.kind == "O":
            return _strings(spec, array)
    else:
        wanted = np.dtype(spec.dtype)
        # np.asarray(order="C"), not np.ascontiguousarray, which makes a scalar 1-d and so would
        # let a rank-0 value pass for a batch of one.
        if array.dtype == wanted:
            return np.asarray(array, order="C")
        if array.dtype.kind in "biuf" and np.can_cast(array.dtype, wanted, casting="same_kind"):
            return np.asarray(array, dtype=wanted, order="C")
    raise InvalidInput(f"input '{spec.name}' must have dtype {spec.dtype}, got {_dtype_name(array)}")


def _strings(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    """A string input's object array with every element bytes (text encoded as UTF-8). An object
    array can hold anything: a number, None, or a list from ragged rows, which TensorFlow would
    refuse far from any error handling; checked here, as numeric dtypes are, for every protocol."""
    flat, encoded = array.ravel(), None
    for index, item in enumerate(flat):
        if isinstance(item, bytes):
            continue
        where = [int(i) for i in np.unravel_index(index, array.shape)] if array.ndim else []
        if not isinstance(item, str):
            kind = "a list (rows of different lengths?)" if isinstance(item, list) else type(item).__name__
            raise InvalidInput(
                f"input '{spec.name}' must have dtype string (bytes or text in every element), "
                f"got {kind} at index {where}"
            )
        try:
            text = item.encode()
        except UnicodeEncodeError:
            raise InvalidInput(
                f"input '{spec.name}': the text at index {where} is not valid Unicode (it holds a lone surrogate)"
            ) from None
        if encoded is None:
            encoded = flat.copy()
        encoded[index] = text
    return array if encoded is None else encoded.reshape(array.shape)


def _dtype_name(array: np.ndarray) -> str:
    return "string" if array.dtype.kind in "SUO" else str(array.dtype)


def _shape_fits(expected: tuple[int | None, ...] | None, got: tuple[int, ...]) -> bool:
    if expected is None:  # unknown rank
        return True
    if len(expected) != len(got):
        return False
    return all(e is None or e == g for e, g in zip(expected, got))


def synthetic_inputs(signature: Signature, bucket: int) -> dict[str, np.ndarray]:
    """Zero inputs (empty strings) of the signature's shapes at one bucket, for warm-up."""
    inputs = {}
    for spec in signature.inputs:
        shape = signature.element_shape(bucket) if signature.elementwise else spec.sized(bucket)
        if spec.dtype == "string":
            from runtime.host_program import warmup_string

            text = warmup_string(signature.host, spec.name) if signature.host else b""
            strings = inputs[spec.name] = np.empty(shape, dtype=object)
            strings.fill(text)  # np.full would strip the example's trailing zero bytes
        else:
            inputs[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return inputs
