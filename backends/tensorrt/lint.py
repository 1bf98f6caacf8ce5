"""Checks an ONNX graph against what TensorRT's ONNX parser accepts, without TensorRT: pure python and onnx.

Called by the tests on every tiny shape's TensorRT-flavour graph, and by the TensorRT backend before a build,
so that a graph TensorRT would refuse fails here, with every reason at once, rather than minutes into a build
on a GPU machine. The parser's published support list for the TensorRT version we target is kept as data in
`onnx_trt_operators.py` (its source, branch, commit and version are in the file). `lint_graph` reports:

- an op from a domain other than ONNX's default one (onnxruntime's `com.microsoft` quantized kernels), an op
  the list does not have or marks unsupported, or a default-domain opset outside the list's range;
- a tensor whose dtype the list does not allow for the op reading it (every input; for Cast, its output too);
- a restriction the list states that can be checked on the graph: inputs that must be initializers (`axes`),
  attribute values (TopK `sorted`, ScatterND `reduction`), TopK's K below its bound;
- an op with a data-dependent output shape (NonZero and the like): the parser accepts some of them, but the
  backend sizes every output from the optimization profile's shapes, so the graph must have none;
- a graph input with a dynamic dimension that a profile does not cover: each profile must give every input
  `(min, opt, max)` shapes of the input's rank, static dimensions equal to the graph's, min <= opt <= max, and
  a named dimension (`batch`, `seq`, `past`) the same in every input that has it.

The result is a list of human-readable problems: empty means the graph passes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ernie_serve.backends.tensorrt import onnx_trt_operators

if TYPE_CHECKING:
    import onnx

# Ops whose output shape depends on the values of their inputs, not only on the input shapes.
DATA_DEPENDENT_OPS = frozenset({"NonZero", "NonMaxSuppression", "Unique", "Compress"})
DEFAULT_DOMAINS = ("", "ai.onnx")

Shape = tuple[int, ...]
# One optimization profile: graph input name -> (min, opt, max) shapes (backends/tensorrt/profiles.py).
Profile = Mapping[str, tuple[Shape, Shape, Shape]]


def operator_list() -> dict[str, Any]:
    """The parser's support list (`onnx_trt_operators.py`): its source, TensorRT version, opset range and
    per-op entries, as one mapping (what `lint_graph` takes as `operators`)."""
    lists = onnx_trt_operators
    return {
        "source": lists.SOURCE,
        "commit": lists.COMMIT,
        "tensorrt": lists.TENSORRT,
        "opsets": lists.OPSETS,
        "operators": lists.OPERATORS,
    }


def lint_graph(
    model: onnx.ModelProto, profiles: Sequence[Profile] = (), operators: Mapping[str, Any] | None = None
) -> list[str]:
    """Every problem TensorRT's ONNX parser (per `operators`, default `operator_list()`) or the backend's
    profiles would have with `model`; see the module docstring. `model` may be loaded without its external
    data: only initializer names, dtypes and the small inline constants are read. Without `profiles`, the
    profile check reports every dynamic dimension as uncovered."""
    import onnx

    operators = operators or operator_list()
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    graph = inferred.graph
    dtypes = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
    dtypes.update({t.name: t.data_type for t in graph.initializer})
    initializers = {t.name: t for t in graph.initializer}
    problems = _opset_problems(model, operators)
    # Shape inference cannot type what a foreign-domain op produces; its own problem says enough.
    foreign = any(node.domain not in DEFAULT_DOMAINS for node in graph.node)
    for node in graph.node:
        problems += _node_problems(node, operators["operators"], dtypes, initializers, foreign)
    problems += profile_problems(model, profiles)
    return problems


def _opset_problems(model: onnx.ModelProto, operators: Mapping[str, Any]) -> list[str]:
    low, high = operators["opsets"]
    problems = []
    for opset in model.opset_import:
        if opset.domain in DEFAULT_DOMAINS and not low <= opset.version <= high:
            problems.append(f"opset {opset.version}: TensorRT {operators['tensorrt']} parses opsets {low} to {high}")
    return problems


def _label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} node {node.name!r}"


def _node_problems(
    node: onnx.NodeProto,
    table: Mapping[str, Any],
    dtypes: Mapping[str, int],
    initializers: Mapping[str, onnx.TensorProto],
    foreign: bool = False,
) -> list[str]:
    from onnx import TensorProto, helper, numpy_helper

    label = _label(node)
    if node.domain not in DEFAULT_DOMAINS:
        return [f"{label}: domain {node.domain!r} is not ONNX's own; TensorRT's parser knows only default-domain ops"]
    entry = table.get(node.op_type)
    if entry is None or not entry["supported"]:
        state = "not in" if entry is None else "marked unsupported in"
        return [f"{label}: {node.op_type} is {state} TensorRT's ONNX operator list"]
    problems = []
    if node.op_type in DATA_DEPENDENT_OPS:
        problems.append(f"{label}: its output shape depends on tensor values (the profiles cannot bound it)")
    allowed = set(entry.get("types", ()))
    checked = [*node.input] + ([*node.output] if node.op_type == "Cast" else [])
    for name in checked:
        if not name:  # an omitted optional input
            continue
        dtype = dtypes.get(name, TensorProto.UNDEFINED)
        if dtype == TensorProto.UNDEFINED:
            if not foreign:
                problems.append(f"{label}: the dtype of {name!r} is unknown (shape inference could not tell)")
        elif TensorProto.DataType.Name(dtype) not in allowed:
            kind, takes = TensorProto.DataType.Name(dtype), ", ".join(sorted(allowed))
            problems.append(f"{label}: {name!r} is {kind}; TensorRT's {node.op_type} takes {takes}")
    for what, index in entry.get("initializer_inputs", {}).items():
        if len(node.input) > index and node.input[index] and node.input[index] not in initializers:
            problems.append(f"{label}: input {what!r} must be an initializer")
    for what, (index, bound) in entry.get("initializer_below", {}).items():
        name = node.input[index] if len(node.input) > index else ""
        if name not in initializers:
            problems.append(f"{label}: input {what!r} must be a constant below {bound} (not an initializer here)")
        elif (numpy_helper.to_array(initializers[name]) >= bound).any():
            problems.append(f"{label}: input {what!r} must be below {bound}")
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    for what, rule in entry.get("attributes", {}).items():
        value = attributes.get(what, rule["default"])
        value = value.decode() if isinstance(value, bytes) else value
        if value not in rule["allowed"]:
            problems.append(f"{label}: attribute {what}={value!r} is unsupported (allowed: {rule['allowed']})")
    return problems


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str | None]:
    """An input's dimensions: an int when static, its name when symbolic, None when unnamed and unknown."""
    dims: list[int | str | None] = []
    for dim in value_info.type.tensor_type.shape.dim:
        dims.append(dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None))
    return dims


def profile_problems(model: onnx.ModelProto, profiles: Sequence[Profile]) -> list[str]:
    """The profile part of `lint_graph`: does each profile cover every graph input (see the module docstring)?"""
    initializers = {t.name for t in model.graph.initializer}
    inputs = {v.name: _dims(v) for v in model.graph.input if v.name not in initializers}
    dynamic = [name for name, dims in inputs.items() if any(not isinstance(d, int) for d in dims)]
    if not profiles:
        return [f"input {name!r} has dynamic dimensions and no profile covers them" for name in dynamic]
    problems = []
    for p, profile in enumerate(profiles):
        for name in sorted(set(profile) - set(inputs)):
            problems.append(f"profile {p}: names {name!r}, which is not a graph input")
        named: dict[str, tuple[Shape, str]] = {}  # symbolic dim -> its (min, opt, max) and the input that set it
        for name, dims in inputs.items():
            if name not in profile:
                if name in dynamic:
                    problems.append(f"profile {p}: no shapes for input {name!r}, which has dynamic dimensions")
                continue
            shapes = [tuple(int(x) for x in shape) for shape in profile[name]]
            if len(shapes) != 3 or any(len(shape) != len(dims) for shape in shapes):
                problems.append(f"profile {p}: input {name!r} needs 3 shapes (min, opt, max) of rank {len(dims)}")
                continue
            for axis, dim in enumerate(dims):
                low, opt, high = (shape[axis] for shape in shapes)
                where = f"profile {p}: input {name!r} axis {axis}"
                if not 0 <= low <= opt <= high:
                    problems.append(f"{where}: needs 0 <= min <= opt <= max, got {low}, {opt}, {high}")
                if isinstance(dim, int) and (low, opt, high) != (dim, dim, dim):
                    problems.append(f"{where}: static {dim} in the graph, the profile gives {low}, {opt}, {high}")
                if isinstance(dim, str):
                    seen = named.setdefault(dim, ((low, opt, high), name))
                    if seen[0] != (low, opt, high):
                        problems.append(f"{where} ({dim!r}): {low, opt, high} here, {seen[0]} in input {seen[1]!r}")
    return problems
