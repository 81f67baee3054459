"""Split a signature with string inputs into a host front and a numeric remainder.

XLA cannot take strings, but most signatures that read them are numeric after their first few ops:
TF Serving's classify/regress parse tf.Examples (ParseExample), recommenders look items up in a
vocabulary (LookupTableFindV2 over a static hash table) or hash them into buckets
(StringToHashBucketFast). In the signature's frozen graph (variables as constants, functions
inlined, as runtime/compiler/elementwise.py reads graphs) every op reachable from a string input
must be one of those (or an Identity); their numeric outputs that other ops read are cut tensors.
The front becomes a HostProgram (runtime/manifest.py, run by runtime/host_program.py) and the
remainder, from the cut tensors and numeric inputs to the outputs, is compiled like any signature.
Anything else that touches a string keeps the signature on the saved-model engine, and the reason
names the op.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.compiler import elementwise
from runtime.manifest import (
    DenseDtype,
    DenseFeature,
    HashBucketStep,
    HostProgram,
    LookupStep,
    ParseExampleStep,
    TensorSpec,
)

HOST_OPS = ("ParseExample", "ParseExampleV2", "LookupTableFindV2", "StringToHashBucketFast")
TABLES_DIR = "host"
DENSE_DTYPES: dict[str, DenseDtype] = {"float32": "float32", "int64": "int64", "string": "string"}


class Unsupported(Exception):
    """Why a signature's string front cannot run on the host."""


@dataclass
class Partition:
    """A signature's host program, the tables it reads (file -> keys, values), and how to build the
    remainder: for each compiled input, the frozen graph's tensor it replaces."""

    program: HostProgram
    tables: dict[str, tuple[np.ndarray, np.ndarray]]
    feeds: dict[str, str]
    outputs: list[str] = field(default_factory=list)
    # LookupTableSizeV2 nodes (StaticVocabularyTable's OOV ids start at the size): node -> the size.
    sizes: dict[str, int] = field(default_factory=dict)
    # The signature's outputs' shapes as the remainder computes them from the cut tensors.
    output_shapes: dict[str, tuple[int | None, ...] | None] = field(default_factory=dict)


def partition_signatures(saved_model: Path, tags: str, keys: list[str]) -> dict[str, Partition | str]:
    """For each signature key, its Partition, or why its string front cannot run on the host."""
    if not keys:
        return {}
    import tensorflow as tf

    loaded = tf.saved_model.load(str(saved_model), tags=tags.split(","))
    results: dict[str, Partition | str] = {}
    for index, key in enumerate(keys):
        try:
            results[key] = _partition(loaded.signatures[key], f"{TABLES_DIR}/s{index:02d}")
        except Unsupported as e:
            results[key] = str(e)
    return results


def _frozen(function):
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    try:
        return convert_variables_to_constants_v2(function)
    except Exception as e:  # TensorFlow raises assorted errors for graphs it cannot freeze
        first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        raise Unsupported(f"its graph could not be read: {first}") from None


def _partition(function, table_prefix: str) -> Partition:
    import tensorflow as tf

    frozen = _frozen(function)
    graph = frozen.graph
    # Resources the frozen graph still reads (tables) are its inputs beyond the signature's own,
    # fed from the original function's captures: name -> the live resource.
    captured = dict(
        zip(
            [t.name for t in function.inputs[len(function.inputs) - len(function.captured_inputs) :]],
            function.captured_inputs,
        )
    )
    consumers: dict[str, list] = {}
    for op in graph.get_operations():
        for tensor in op.inputs:
            consumers.setdefault(tensor.name, []).append(op)
    strings = [t for t in frozen.inputs if t.dtype == tf.string]
    host_ops, alias = _front(strings, consumers)
    steps: list[ParseExampleStep | HashBucketStep | LookupStep] = []
    tables: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    # The signature's inputs, by the names requests use (a TF1 placeholder "tf_example:0" is "inputs").
    names: dict[str, str] = {
        t.name: key for t, key in zip(frozen.inputs, sorted(function.structured_input_signature[1]))
    }
    for op in host_ops:  # already in an order where each op follows what it reads
        if op.type == "Identity":
            continue
        for out in op.outputs:
            names[out.name] = f"front_{len(names)}"
        source = names[alias(op.inputs[1 if op.type == "LookupTableFindV2" else 0]).name]
        if op.type in ("ParseExample", "ParseExampleV2"):
            steps.append(_parse_step(op, source, names))
        elif op.type == "StringToHashBucketFast":
            steps.append(
                HashBucketStep(input=source, output=names[op.outputs[0].name], buckets=op.get_attr("num_buckets"))
            )
        else:
            file = f"{table_prefix}_t{len(tables)}.npz"
            tables[file] = _table_contents(op, captured)
            default = _constant(op.inputs[2], "the lookup's default value")
            steps.append(LookupStep(input=source, output=names[op.outputs[0].name], table=file, default=default.item()))
    host = {op.name for op in host_ops}
    cut: dict[str, Any] = {}  # tf.Tensor
    for op in host_ops:
        for out in op.outputs:
            readers = [reader for reader in consumers.get(out.name, []) if reader.name not in host]
            if readers and out.dtype in (tf.string, tf.resource):
                raise Unsupported(
                    f"op {readers[0].type} ('{readers[0].name}') reads a string; Kiln runs only "
                    f"{', '.join(HOST_OPS)} on strings"
                )
            if readers:
                cut[alias(out).name] = alias(out)
    for output in frozen.outputs:
        if output.dtype == tf.string or output.op.name in host:
            raise Unsupported(
                f"output '{output.name}' is computed on strings by the front itself; only "
                f"numeric outputs of compiled ops are supported"
            )
    specs, feeds = [], {}
    for tensor_name, tensor in cut.items():
        name = names[tensor_name]
        shape = tensor.shape
        if tensor.op.type == "LookupTableFindV2" and shape.rank is None:  # shaped as its keys
            shape = alias(tensor.op.inputs[1]).shape
        if tensor.op.type in ("ParseExample", "ParseExampleV2") and shape.rank is None:  # of a vector of protos
            dense_shape = tf.TensorShape(tensor.op.get_attr("dense_shapes")[tensor.value_index])
            shape = tf.TensorShape([None]).concatenate(dense_shape)
        dims = None if shape.rank is None else tuple(shape.as_list())
        specs.append(TensorSpec(name=name, dtype=tensor.dtype.name, shape=dims))
        feeds[name] = tensor_name
    for tensor in frozen.inputs:
        if tensor.dtype not in (tf.string, tf.resource) and consumers.get(tensor.name):
            name = names[tensor.name]
            shape = tensor.shape
            specs.append(
                TensorSpec(
                    name=name, dtype=tensor.dtype.name, shape=None if shape.rank is None else tuple(shape.as_list())
                )
            )
            feeds[name] = tensor.name
    sizes = {
        op.name: int(tf.raw_ops.LookupTableSizeV2(table_handle=_table(op, captured)))
        for op in graph.get_operations()
        if op.type == "LookupTableSizeV2"
    }
    program = HostProgram(steps=tuple(steps), outputs=tuple(specs))
    partition = Partition(
        program=program, tables=tables, feeds=feeds, outputs=[t.name for t in frozen.outputs], sizes=sizes
    )
    partition.output_shapes = _output_shapes(function, partition)
    return partition


def _output_shapes(function, partition: Partition) -> dict[str, tuple[int | None, ...] | None]:
    """The remainder's output shapes, traced from the cut tensors' (a TF1 signature may declare
    outputs of unknown rank that are known once its inputs are vectors)."""
    import tensorflow as tf

    run = remainder(function, partition)
    specs = {
        spec.name: tf.TensorSpec(spec.shape, tf.as_dtype(spec.dtype), name=spec.name)
        for spec in partition.program.outputs
    }
    traced = tf.function(lambda **kwargs: run(**kwargs)).get_concrete_function(**specs).structured_outputs
    return {
        name: None if tensor.shape.rank is None else tuple(tensor.shape.as_list()) for name, tensor in traced.items()
    }


def _front(strings, consumers):
    """The host ops reachable from the string inputs, in topological order, and a function giving
    the tensor an Identity chain stands for. Raises Unsupported naming any other op reading a string."""
    import tensorflow as tf

    order, seen = [], set()
    frontier = list(strings)
    while frontier:
        tensor = frontier.pop(0)
        for op in consumers.get(tensor.name, []):
            if op.name in seen:
                continue
            if op.type not in HOST_OPS and op.type != "Identity":
                if tensor.dtype == tf.string:
                    raise Unsupported(
                        f"op {op.type} ('{op.name}') reads a string; Kiln runs only {', '.join(HOST_OPS)} on strings"
                    )
                continue  # numeric: the compiled remainder reads it
            if op.type == "Identity" and tensor.dtype != tf.string:
                continue  # an Identity on a numeric front output belongs to the remainder
            seen.add(op.name)
            order.append(op)
            frontier.extend(op.outputs)

    def alias(tensor):
        while tensor.op.type == "Identity" and tensor.op.name in seen:
            tensor = tensor.op.inputs[0]
        return tensor

    return _topological(order), alias


def _topological(ops):
    names = {op.name for op in ops}
    placed, result = set(), []
    pending = list(ops)
    while pending:
        progress = False
        for op in list(pending):
            if all(t.op.name not in names or t.op.name in placed for t in op.inputs):
                result.append(op)
                placed.add(op.name)
                pending.remove(op)
                progress = True
        if not progress:
            raise Unsupported("the string front has a cycle")
    return result


def _constant(tensor, what: str) -> np.ndarray:
    import tensorflow as tf

    if tensor.op.type == "Reshape":  # tf.get_static_value does not fold it; ParseExampleV2's defaults use it
        value = _constant(tensor.op.inputs[0], what).reshape(_constant(tensor.op.inputs[1], what))
    else:
        value = tf.get_static_value(tensor)
    if value is None:
        raise Unsupported(f"{what} ('{tensor.name}') is not a constant")
    return np.asarray(value)


def _parse_step(op, source: str, names: dict[str, str]) -> ParseExampleStep:
    """ParseExample(V2) with dense features only: keys, dtypes, shapes and defaults from the graph."""
    if op.type == "ParseExampleV2":
        sparse, dense_keys = _constant(op.inputs[2], "sparse keys"), _constant(op.inputs[3], "dense keys")
        ragged = _constant(op.inputs[4], "ragged keys")
        defaults = op.inputs[5:]
        if sparse.size or ragged.size:
            raise Unsupported(
                f"op {op.type} ('{op.name}') parses sparse or ragged features; Kiln's host parser "
                f"takes dense (FixedLenFeature) features only"
            )
        keys = [k.decode() for k in dense_keys.reshape(-1).tolist()]
    else:
        num_sparse = op.get_attr("Nsparse")
        if num_sparse:
            raise Unsupported(
                f"op {op.type} ('{op.name}') parses sparse features; Kiln's host parser takes "
                f"dense (FixedLenFeature) features only"
            )
        count = op.get_attr("Ndense")
        keys = [_constant(t, "a dense key").item().decode() for t in op.inputs[2 : 2 + count]]
        defaults = op.inputs[2 + count :]
    import tensorflow as tf

    dense = []
    for key, default, shape, dtype in zip(keys, defaults, op.get_attr("dense_shapes"), op.get_attr("Tdense")):
        shape = tf.TensorShape(shape)
        dims = tuple(shape.as_list()) if shape.rank is not None else None
        if dims is None or any(d is None or d < 0 for d in dims):
            raise Unsupported(
                f"op {op.type} ('{op.name}') parses feature '{key}' of variable length; Kiln's host "
                f"parser takes fixed-length features only"
            )
        if dtype.name not in DENSE_DTYPES:
            raise Unsupported(f"op {op.type} ('{op.name}') parses feature '{key}' as {dtype.name}")
        value = _constant(default, f"the default of feature '{key}'")
        values = None
        if value.size:
            flat = np.broadcast_to(value, dims).reshape(-1).tolist()
            values = tuple(base64.b64encode(v).decode() for v in flat) if dtype.name == "string" else tuple(flat)
        dense.append(DenseFeature(key=key, dtype=DENSE_DTYPES[dtype.name], shape=dims, default=values))
    # Outputs: sparse indices/values/shapes (none here), then one dense value per key, then ragged.
    return ParseExampleStep(
        input=source, outputs=tuple(names[op.outputs[i].name] for i in range(len(dense))), dense=tuple(dense)
    )


def _table_contents(op, captured) -> tuple[np.ndarray, np.ndarray]:
    """The keys and values of the static table a LookupTableFindV2 reads, exported from the live table."""
    import tensorflow as tf

    resource = _table(op, captured)
    key_dtype, value_dtype = op.get_attr("Tin"), op.get_attr("Tout")
    if key_dtype not in (tf.string, tf.int64, tf.int32) or value_dtype not in (tf.int64, tf.int32, tf.float32):
        raise Unsupported(f"op {op.type} ('{op.name}') maps {key_dtype.name} to {value_dtype.name}")
    keys, values = tf.raw_ops.LookupTableExportV2(table_handle=resource, Tkeys=key_dtype, Tvalues=value_dtype)
    keys = keys.numpy()
    return (keys.astype(object) if key_dtype == tf.string else keys), values.numpy()


def _table(op, captured):
    """The live table resource an op reads (its first input, through Identities)."""
    handle = op.inputs[0]
    while handle.op.type == "Identity":
        handle = handle.op.inputs[0]
    resource = captured.get(handle.name)
    if resource is None:
        raise Unsupported(f"op {op.type} ('{op.name}') reads a table Kiln cannot find ('{handle.name}')")
    return resource


def remainder(function, partition: Partition):
    """A callable(**compiled inputs) -> {output name: tensor} computing the signature's outputs
    from the cut tensors: the frozen graph pruned to start at them."""
    import tensorflow as tf

    frozen = _frozen(function)
    graph_def = frozen.graph.as_graph_def()
    for node in graph_def.node:
        # Control edges only order stateful ops (the front's table reads); the remainder has none.
        node.input[:] = [name for name in node.input if not name.startswith("^")]
        if node.name in partition.sizes:  # the table's size, a constant of a static table
            name, size = node.name, partition.sizes[node.name]
            node.Clear()
            node.name, node.op = name, "Const"
            node.attr["dtype"].type = tf.int64.as_datatype_enum
            node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(size, tf.int64))
    wrapped = tf.compat.v1.wrap_function(lambda: tf.graph_util.import_graph_def(graph_def, name=""), [])
    names = list(partition.feeds)
    pruned = wrapped.prune(
        feeds=[wrapped.graph.get_tensor_by_name(partition.feeds[n]) for n in names],
        fetches=[wrapped.graph.get_tensor_by_name(t) for t in partition.outputs],
    )
    output_names = elementwise.output_names(function)

    def run(**inputs):
        return dict(zip(output_names, pruned(*[inputs[n] for n in names])))

    return run


def write_tables(partitions: dict[str, Partition], staging: Path) -> None:
    """Every partition's tables as files of the servable (checksummed like the others)."""
    from runtime.host_program import save_table

    for partition in partitions.values():
        for file, (keys, values) in partition.tables.items():
            (staging / file).parent.mkdir(parents=True, exist_ok=True)
            save_table(staging / file, keys, values)
