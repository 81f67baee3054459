"""Reading a SavedModel's signatures, and re-exporting them with static shapes, one per bucket.

XLA AOT needs every shape fixed. Users export one signature with a dynamic batch dimension; we load
it and save a SavedModel holding, for each signature and bucket, a function that calls it with the
batch fixed, so the compiled code is the user's own graph.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import CompileError
from runtime.manifest import HostProgram, Position, TensorSpec, element_shape, show_shape

AOT_DTYPES = {
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
    "complex64",
    "complex128",
}


@dataclass(frozen=True)
class SignatureInfo:
    key: str
    method: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Declared at compile time (kiln compile --state, --state-capacity), not read from the SavedModel.
    state: Mapping[str, str] = field(default_factory=dict)
    position: Position | None = None
    appended: tuple[str, ...] = ()
    # Decided by the compiler (runtime/compiler/elementwise.py): compiled over flat runs of elements.
    elementwise: bool = False
    # A digest of the graph function the signature calls and what it captures ("" when not recognized):
    # signatures with equal `same_function()` keys compile once.
    function: str = ""
    # Decided by the compiler (runtime/compiler/partition.py): the string front run on the host; the
    # libraries then take its outputs instead of the inputs.
    host: HostProgram | None = None

    def same_function(self) -> tuple | None:
        """What must agree for two signatures to share compiled code, or None if this one shares none."""
        if not self.function:
            return None
        return (
            self.function,
            self.inputs,
            self.outputs,
            tuple(sorted(self.state.items())),
            self.position,
            self.appended,
            self.elementwise,
            self.host,
        )

    @property
    def compiled_inputs(self) -> tuple[TensorSpec, ...]:
        """What the compiled code takes: the inputs, or behind a host program its outputs."""
        return self.host.outputs if self.host else self.inputs

    @property
    def batched(self) -> bool:
        """Dimension 0 of every input and output is free: the batch (for an elementwise signature,
        the buckets count elements)."""
        return self.elementwise or all(
            spec.shape and spec.shape[0] is None for spec in self.compiled_inputs + self.outputs
        )

    def aot_obstacle(self) -> str:
        """Why XLA AOT cannot take this signature as it stands, or "" if nothing is known against it."""
        return self.dtype_obstacle() or ("" if self.elementwise else self.shape_obstacle())

    def dtype_obstacle(self) -> str:
        for role, spec in self._specs():
            if spec.dtype not in AOT_DTYPES:
                return f"{role} '{spec.name}' has dtype {spec.dtype}, which XLA AOT cannot take"
        return ""

    def shape_obstacle(self) -> str:
        """Why the shapes alone keep XLA AOT from taking it as a batch of fixed-shape rows, or ""."""
        for role, spec in self._specs():
            if spec.shape is None:
                return f"{role} '{spec.name}' has unknown rank; XLA AOT needs every dimension but the batch fixed"
            inner = spec.shape[1:] if self.batched else spec.shape
            if any(dim is None for dim in inner):
                return (
                    f"{role} '{spec.name}' has shape {show_shape(spec.shape)} with a dynamic inner "
                    f"dimension; XLA AOT needs every dimension but the batch fixed"
                )
        return ""

    def flat_inputs(self) -> bool:
        """Whether every input could hold a run of elements of any length: unknown rank, or a known
        rank of 1 or more with every dimension dynamic, one rank for all (elementwise candidates)."""
        ranks = {len(spec.shape) for spec in self.inputs if spec.shape is not None}
        return (
            bool(self.inputs)
            and len(ranks) <= 1
            and 0 not in ranks
            and all(spec.shape is None or all(dim is None for dim in spec.shape) for spec in self.inputs)
        )

    def _specs(self):
        return [("input", spec) for spec in self.compiled_inputs] + [("output", spec) for spec in self.outputs]

    def specs_for(self, batch: int) -> tuple[TensorSpec, ...]:
        """The inputs with the batch dimension fixed (unchanged for an unbatched signature); for an
        elementwise one, `batch` elements in the inputs' declared rank."""
        if self.elementwise:
            shape = element_shape(self.inputs, batch)
            return tuple(spec.replace(shape=shape) for spec in self.inputs)
        if not self.batched:
            return self.compiled_inputs
        return tuple(spec.replace(shape=(batch, *spec.known_shape[1:])) for spec in self.compiled_inputs)


def read_signatures(saved_model_dir: Path, tags: str = "serve") -> dict[str, SignatureInfo]:
    """Every callable signature of the MetaGraph for the tag set, as the SavedModel declares it."""
    from tensorflow.python.tools import saved_model_utils

    try:
        meta_graph = saved_model_utils.get_meta_graph_def(str(saved_model_dir), tags)
    except (OSError, RuntimeError, ValueError) as e:
        raise CompileError(f"cannot read a SavedModel with tags '{tags}' at {saved_model_dir}: {e}") from None
    return {
        key: SignatureInfo(
            key,
            sig.method_name or "tensorflow/serving/predict",
            _specs(sig.inputs),
            _specs(sig.outputs),
            function=function_digest(meta_graph, sig),
        )
        for key, sig in sorted(meta_graph.signature_def.items())
        if not key.startswith("__")
    }


def function_digest(meta_graph, signature_def) -> str:
    """A digest of what a TF2 signature computes, equal for two signatures that are one function.

    A TF2 SavedModel gives each signature its own wrapper (Keras's `serve` and `serving_default`:
    `__inference_signature_wrapper_72` and `_81`) around one call node; the wrappers differ only by
    name and the `_user_specified_name` of their captures. The digest covers the wrapper without
    those, the call node's inputs (each placeholder as the signature input it feeds, captures by
    name) and which call output each signature output is. "" for any other graph shape: such a
    signature is compiled on its own.
    """
    nodes = {node.name: node for node in meta_graph.graph_def.node}
    functions = {f.signature.name: f for f in meta_graph.graph_def.library.function}
    outputs = {key: info.name.partition(":") for key, info in signature_def.outputs.items()}
    callers = {node for node, _, _ in outputs.values()}
    if len(callers) != 1 or not all(info.name for info in signature_def.inputs.values()):
        return ""
    call = nodes.get(callers.pop())
    if call is None or call.op not in ("StatefulPartitionedCall", "PartitionedCall"):
        return ""
    wrapper = functions.get(call.attr["f"].func.name)
    if wrapper is None:
        return ""
    body = type(wrapper)()
    body.CopyFrom(wrapper)
    body.signature.name = ""
    for attrs in body.arg_attr.values():
        attrs.attr.pop("_user_specified_name", None)
    fed = {info.name.partition(":")[0]: key for key, info in signature_def.inputs.items()}
    digest = hashlib.sha256(body.SerializeToString(deterministic=True))
    digest.update(repr([f"input {fed[name]}" if name in fed else name for name in call.input]).encode())
    digest.update(repr(sorted((key, index) for key, (_, _, index) in outputs.items())).encode())
    return digest.hexdigest()


def _specs(tensor_infos) -> tuple[TensorSpec, ...]:
    import tensorflow as tf

    specs = []
    for name, info in sorted(tensor_infos.items()):
        shape = tf.TensorShape(info.tensor_shape)
        dims = None if shape.rank is None else tuple(shape.as_list())
        specs.append(TensorSpec(name=name, dtype=tf.as_dtype(info.dtype).name, shape=dims))
    return tuple(specs)


def bucket_key(signature_key: str, batch: int) -> str:
    return f"kiln_{signature_key}__b{batch}"


def export_static(
    saved_model_dir: Path,
    tags: str,
    infos: Mapping[str, SignatureInfo],
    plan: dict[str, list[int]],
    out: Path,
    rewrites: Mapping[str, Callable] | None = None,
) -> None:
    """Save a SavedModel with signature bucket_key(key, b) for each key and bucket b in the plan.

    An unbatched signature is planned with the single bucket 0 and keeps its own static shapes.
    `rewrites` {key: f} compiles f(the signature's function) instead (a host program's remainder).
    """
    import tensorflow as tf

    loaded = tf.saved_model.load(str(saved_model_dir), tags=tags.split(","))
    module = tf.Module()
    module.loaded = loaded  # tracked, so the variables are saved with the new signatures
    signatures = {}
    for key, batches in plan.items():
        function = loaded.signatures[key]
        if rewrites and key in rewrites:
            function = rewrites[key](function)
        for batch in batches:
            specs = infos[key].specs_for(batch)
            static = {s.name: tf.TensorSpec(s.shape, tf.as_dtype(s.dtype), name=s.name) for s in specs}
            signatures[bucket_key(key, batch)] = _caller(function).get_concrete_function(**static)
    tf.saved_model.save(module, str(out), signatures=signatures)


def _caller(function):
    import tensorflow as tf

    return tf.function(lambda **kwargs: function(**kwargs))
