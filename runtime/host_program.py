"""A signature's string front, run on the host: the steps `kiln compile` cut off the graph
(runtime/compiler/partition.py) because XLA cannot take strings, bit-exact with TensorFlow's ops.

- parse_example: ParseExample/ParseExampleV2's dense features (runtime/tf_example.py).
- lookup: LookupTableFindV2 over a static hash table (StringLookup, IntegerLookup, feature columns'
  vocabularies). Its keys and values were exported from the table at compile time into an .npz file
  of the servable (string keys as one byte string and offsets, so any bytes survive; read with
  allow_pickle=False). Out-of-vocabulary buckets need nothing here: TensorFlow builds them from a
  StringToHashBucketFast and a select, which the compiled remainder computes.
- hash_bucket: StringToHashBucketFast, farmhash's Fingerprint64 (pyfarmhash, checked against
  TensorFlow by tests/test_host_program.py) modulo the bucket count.

The outputs feed the compiled libraries; everything before them is plain Python over the batch's
strings, cheap beside parsing the request that carried them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.errors import ServableError
from runtime.manifest import HashBucketStep, HostProgram, LookupStep, ParseExampleStep
from runtime.tf_example import KINDS

STRING_KEYS = ("key_bytes", "key_offsets")


def save_table(path: Path, keys: np.ndarray, values: np.ndarray) -> None:
    """Write a table's keys (bytes objects or integers) and values as a .npz without pickles."""
    arrays: dict[str, np.ndarray]
    if keys.dtype == object:
        lengths = np.array([len(k) for k in keys], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        arrays = {"key_bytes": np.frombuffer(b"".join(keys), dtype=np.uint8), "key_offsets": offsets}
    else:
        arrays = {"keys": keys}
    with open(path, "wb") as f:
        np.savez(f, values=values, **arrays)  # type: ignore[arg-type]  # numpy's stub reads ** as allow_pickle


def load_table(path: Path) -> dict:
    """The table as a dict from key (bytes or int) to value."""
    try:
        with np.load(path, allow_pickle=False) as data:
            values = data["values"].tolist()
            if "keys" in data:
                keys = data["keys"].tolist()
            else:
                raw, offsets = data["key_bytes"].tobytes(), data["key_offsets"].tolist()
                keys = [raw[start:stop] for start, stop in zip(offsets, offsets[1:])]
    except (OSError, ValueError, KeyError) as e:
        raise ServableError(f"lookup table {path.name} cannot be read: {e}") from None
    if len(keys) != len(values):
        raise ServableError(f"lookup table {path.name} has {len(keys)} keys but {len(values)} values")
    return dict(zip(keys, values))


class HostFront:
    """A host program ready to run: its tables loaded."""

    def __init__(self, directory: Path, program: HostProgram):
        self.program = program
        self.tables = {
            step.table: load_table(directory / step.table) for step in program.steps if isinstance(step, LookupStep)
        }
        self.dtypes = {spec.name: spec.dtype for spec in program.outputs}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The compiled code's inputs from the signature's (checked, at most one bucket of rows)."""
        values = dict(inputs)
        for step in self.program.steps:
            if isinstance(step, ParseExampleStep):
                from runtime.tf_example import parse_dense

                values.update(zip(step.outputs, parse_dense(values[step.input], step.dense)))
            elif isinstance(step, LookupStep):
                keys = values[step.input]
                table, default = self.tables[step.table], step.default
                found = [table.get(key, default) for key in keys.ravel().tolist()]
                values[step.output] = np.array(found, dtype=self.dtypes.get(step.output)).reshape(keys.shape)
            elif isinstance(step, HashBucketStep):
                values[step.output] = hash_buckets(values[step.input], step.buckets)
        return {spec.name: np.ascontiguousarray(values[spec.name], dtype=spec.dtype) for spec in self.program.outputs}


def hash_buckets(strings: np.ndarray, buckets: int) -> np.ndarray:
    """StringToHashBucketFast: Fingerprint64(s) % buckets, int64, in the strings' shape."""
    from farmhash import fingerprint64

    flat = [fingerprint64(s) % buckets for s in strings.ravel().tolist()]
    return np.array(flat, dtype=np.int64).reshape(strings.shape)


class FrontedRunner:
    """A signature's runner behind its host program: the front turns the inputs into the compiled
    code's, the runner (AotRunner over Signature.compiled()) does the rest."""

    def __init__(self, front: HostFront, runner):
        self.front = front
        self.runner = runner

    def run(self, inputs: dict[str, np.ndarray], bucket: int) -> dict[str, np.ndarray]:
        return self.runner.run(self.front.run(inputs), bucket)

    def close(self) -> None:
        self.runner.close()


def warmup_string(program: HostProgram, name: str) -> bytes:
    """A string for input `name` that the program accepts: for a ParseExample input, a tf.Example
    holding every dense feature (zeros, empty strings); else the empty string."""
    step = next((s for s in program.steps if isinstance(s, ParseExampleStep) and s.input == name), None)
    if step is None:
        return b""
    from runtime.tf_example import example_class

    example = example_class()()
    for feature in step.dense:
        size = int(np.prod(feature.shape))
        values = getattr(example.features.feature[feature.key], KINDS[feature.dtype][0]).value
        values.extend([b""] * size if feature.dtype == "string" else [0] * size)
    return example.SerializeToString()
