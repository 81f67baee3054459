"""Is a signature elementwise over its inputs? Then XLA AOT can take it whatever their rank.

TF Serving's own half_plus_two reads a placeholder of unknown rank: y = 0.5 * x + 2 answers any
shape. XLA AOT needs static shapes, but a computation made only of elementwise ops, whose other
operands are scalars, gives each output element from the input elements at the same place, so it
can be compiled over a flat vector per bucket and serve any shape by flattening the request and
reshaping the outputs (runtime/manifest.py). This module decides that from the signature's graph,
frozen (variables as constants, called functions inlined) so that TF1 and TF2 SavedModels read alike.
"""

from __future__ import annotations

from pathlib import Path

# Ops computing each output element from the operands' elements at the same place, given operands
# of one shape or scalars. (Select with a vector condition picks rows, but its condition is then
# a non-scalar operand, so it must have the shape of the others.)
ELEMENTWISE_OPS = frozenset(
    """
    Identity Snapshot StopGradient PreventGradient Cast Bitcast
    Neg Abs Sign Square Sqrt Rsqrt Reciprocal Inv Exp Expm1 Log Log1p Sin Cos Tan Asin Acos Atan Sinh Cosh
    Tanh Asinh Acosh Atanh Sigmoid Relu Relu6 Elu Selu Softplus Softsign LeakyRelu Erf Erfc Erfinv Lgamma
    Digamma Floor Ceil Round Rint IsNan IsInf IsFinite LogicalNot Invert Real Imag Conj
    Add AddV2 Sub Mul MulNoNan Div DivNoNan RealDiv TruncateDiv FloorDiv FloorMod Mod TruncateMod Maximum
    Minimum Pow SquaredDifference Atan2 Xdivy Xlogy Xlog1py Less LessEqual Greater GreaterEqual Equal NotEqual
    LogicalAnd LogicalOr BitwiseAnd BitwiseOr BitwiseXor LeftShift RightShift Complex
    Select SelectV2 AddN ClipByValue
""".split()
)
SCALAR, ELEMENTS = "scalar", "elements"


def elementwise_obstacles(saved_model: Path, tags: str, keys: list[str]) -> dict[str, str]:
    """For each signature key, why it is not elementwise over its inputs, or "" when it is: every op
    between its inputs and outputs is one of ELEMENTWISE_OPS whose operands are inputs' elements or
    rank-0 constants, and every output depends on an input."""
    if not keys:
        return {}
    import tensorflow as tf

    loaded = tf.saved_model.load(str(saved_model), tags=tags.split(","))  # alive while its functions freeze
    return {key: _obstacle(loaded.signatures[key]) for key in keys}


def _obstacle(function) -> str:
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    try:
        frozen = convert_variables_to_constants_v2(function)
    except Exception as e:  # TensorFlow raises assorted errors for graphs it cannot freeze
        return f"its graph could not be read: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}"
    nodes = {node.name: node for node in frozen.graph.as_graph_def().node}
    kinds: dict[str, str] = {}
    for output, tensor in zip(_output_names(function), frozen.outputs):
        node = tensor.name.split(":")[0]
        problem = _kind(node, nodes, kinds)
        if problem:
            return f"output '{output}': {problem}"
        if kinds[node] != ELEMENTS:
            return f"output '{output}' does not depend on the inputs"
    return ""


def _output_names(function) -> list[str]:
    """The signature's output names in the order of the function's output tensors."""
    import tensorflow as tf

    structured = function.structured_outputs
    if isinstance(structured, dict):
        return sorted(structured)
    return [str(index) for index in range(len(tf.nest.flatten(structured)))]


def _kind(name: str, nodes: dict, kinds: dict[str, str]) -> str:
    """Classify node `name` (and what it reads) into `kinds` as SCALAR or ELEMENTS; a problem, or ""."""
    stack = [name]
    while stack:
        current = stack[-1]
        if current in kinds:
            stack.pop()
            continue
        node = nodes[current]
        operands = [i.split(":")[0] for i in node.input if not i.startswith("^")]  # control inputs carry no values
        if node.op == "Placeholder":
            kinds[current] = ELEMENTS
        elif node.op == "Const":
            shape = node.attr["value"].tensor.tensor_shape
            if shape.unknown_rank or shape.dim:
                return (
                    f"constant '{current}' of shape {[d.size for d in shape.dim]} would broadcast; only "
                    f"scalar (rank-0) constants keep the inputs' shape"
                )
            kinds[current] = SCALAR
        elif node.op not in ELEMENTWISE_OPS:
            return f"op {node.op} ('{current}') is not elementwise"
        else:
            pending = [operand for operand in operands if operand not in kinds]
            if pending:
                stack.extend(pending)
                continue
            kinds[current] = ELEMENTS if any(kinds[operand] == ELEMENTS for operand in operands) else SCALAR
        stack.pop()
    return ""
