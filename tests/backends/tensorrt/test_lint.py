"""The lint against TensorRT's ONNX parser: the TensorRT flavour of every tiny shape passes in every dtype, the
onnxruntime flavour does not (data-dependent routing, contrib ops when quantized), and each rule catches what
it names on a small hand-made graph."""

from __future__ import annotations

import pytest
import torch

onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from ernie_serve.backends.onnx.export import build_torch_model  # noqa: E402
from ernie_serve.backends.onnx.graph import GraphQuantization, build_graph  # noqa: E402
from ernie_serve.backends.tensorrt import onnx_trt_operators  # noqa: E402
from ernie_serve.backends.tensorrt.lint import lint_graph, operator_list, profile_problems  # noqa: E402
from ernie_serve.backends.tensorrt.profiles import profiles  # noqa: E402
from ernie_serve.models import read_model_config  # noqa: E402
from ernie_serve.quantization import QuantSpec  # noqa: E402
from ernie_serve.testing.checkpoints import TINY_SHAPES  # noqa: E402

MOE_SHAPES = [shape for shape, options in TINY_SHAPES.items() if options["model_type"] == "ernie4_5_moe"]
LIMITS = {"max_batch_tokens": 24, "max_seqs": 4, "max_model_len": 48}


@pytest.fixture(scope="module")
def sources(tiny_checkpoint):
    made = {}

    def get(shape: str):
        if shape not in made:
            checkpoint = tiny_checkpoint(shape, torch.bfloat16)
            config = read_model_config(checkpoint)
            made[shape] = config, dict(build_torch_model(config, str(checkpoint), 0).checkpoint_targets())
        return made[shape]

    return get


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("shape", list(TINY_SHAPES))
def test_tensorrt_flavour_lints_clean_with_its_profiles(sources, shape: str, dtype: str) -> None:
    config, weights = sources(shape)
    model, _ = build_graph(config, weights, flavour="tensorrt", dtype=dtype)
    assert lint_graph(model, profiles(config, **LIMITS)) == []


@pytest.mark.parametrize("shape", MOE_SHAPES)
def test_onnxruntime_flavour_fails_on_data_dependent_routing(sources, shape: str) -> None:
    config, weights = sources(shape)
    model, _ = build_graph(config, weights)
    problems = lint_graph(model, profiles(config, **LIMITS))
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    nonzero = [p for p in problems if p.startswith("NonZero node") and "depends on tensor values" in p]
    assert len(nonzero) == moe_layers * config.moe_num_experts
    # besides routing, only the fused RoPE (onnxruntime's RotaryEmbedding, for queries and keys) is foreign to it
    rope = [p for p in problems if p.startswith("RotaryEmbedding node") and "com.microsoft" in p]
    assert len(rope) == 2 * config.num_hidden_layers
    assert len(problems) == len(nonzero) + len(rope)


@pytest.mark.parametrize("shape", ["moe_top1_dense_tail", "dense_bias_headdim"])
def test_quantized_graph_fails_on_onnxruntime_contrib_ops(sources, shape: str) -> None:
    config, weights = sources(shape)
    model, _ = build_graph(config, weights, quant=GraphQuantization(QuantSpec.of("wint4", 128)))
    problems = lint_graph(model, profiles(config, **LIMITS))
    assert problems and any("domain 'com.microsoft' is not ONNX's own" in p for p in problems)
    assert not any("unknown" in p for p in problems)  # the contrib op's own problem is enough


def test_the_operator_list_names_its_source_and_version() -> None:
    data = operator_list()
    assert data["source"].startswith("https://github.com/onnx/onnx-tensorrt/blob/release/10.1-GA/")
    assert len(data["commit"]) == 40 and data["tensorrt"].startswith("10.")
    assert onnx_trt_operators.BRANCH == "release/10.1-GA" and data["opsets"] == (9, 20)
    names = set(TensorProto.DataType.keys())
    for op, entry in data["operators"].items():
        assert set(entry.get("types", ())) <= names, op
        assert entry["supported"] == bool(entry.get("types")), op
    table = data["operators"]
    assert table["ScatterND"]["attributes"]["reduction"]["allowed"] == ["none"]
    assert table["NonZero"]["types"] == ["FLOAT", "FLOAT16"]
    assert not table["MatMulInteger"]["supported"] and "MatMulNBits" not in table


# ----- each rule on a small graph -----


def _model(nodes, inputs, outputs, initializers=(), opset: int = 17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _info(name: str, dtype: int, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, dims)


def _const(name: str, values, dtype=None):
    import numpy as np

    return numpy_helper.from_array(np.asarray(values, dtype=dtype or np.int64), name)


def _lint(model) -> list[str]:
    shapes = {i.name: [d.dim_value or 4 for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    profile = {name: (tuple(s), tuple(s), tuple(s)) for name, s in shapes.items()}
    return lint_graph(model, [profile])


X = _info("x", TensorProto.FLOAT, ["n", 4])
Y = _info("y", TensorProto.FLOAT, None)


def test_a_clean_small_graph_passes() -> None:
    model = _model([helper.make_node("ReduceSum", ["x", "axes"], ["y"])], [X], [Y], [_const("axes", [1])])
    assert _lint(model) == []


def test_an_op_missing_from_the_list_or_unsupported() -> None:
    model = _model([helper.make_node("Det", ["x"], ["y"])], [X], [Y])
    assert _lint(model) == ["Det node '': Det is marked unsupported in TensorRT's ONNX operator list"]
    model = _model([helper.make_node("RotaryEmbedding", ["x"], ["y"])], [X], [Y])  # newer than TensorRT 10.1's list
    assert _lint(model) == ["RotaryEmbedding node '': RotaryEmbedding is not in TensorRT's ONNX operator list"]


def test_a_foreign_domain() -> None:
    node = helper.make_node("FusedMatMul", ["x", "x"], ["y"], domain="com.microsoft")
    model = _model([node], [X], [Y])
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    assert _lint(model) == [
        "FusedMatMul node '': domain 'com.microsoft' is not ONNX's own; TensorRT's parser knows only default-domain ops"
    ]


def test_a_dtype_the_op_does_not_take() -> None:
    ints = _info("x", TensorProto.INT32, ["n", 4])
    model = _model([helper.make_node("MatMul", ["x", "x"], ["y"])], [ints], [Y])
    problems = _lint(model)
    assert problems == ["MatMul node '': 'x' is INT32; TensorRT's MatMul takes BFLOAT16, FLOAT, FLOAT16"] * 2
    cast = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE)  # Cast's output is checked too
    doubles = _info("y", TensorProto.DOUBLE, None)
    assert _lint(_model([cast], [X], [doubles])) == [
        "Cast node '': 'y' is DOUBLE; TensorRT's Cast takes " + ("BFLOAT16, BOOL, FLOAT, FLOAT16, INT32, INT64, UINT8")
    ]


def test_data_dependent_shapes() -> None:
    model = _model([helper.make_node("NonZero", ["x"], ["y"])], [X], [Y])
    assert _lint(model) == ["NonZero node '': its output shape depends on tensor values (the profiles cannot bound it)"]


def test_inputs_that_must_be_initializers() -> None:
    axes = _info("axes", TensorProto.INT64, [1])
    model = _model([helper.make_node("ReduceSum", ["x", "axes"], ["y"])], [X, axes], [Y])
    assert "ReduceSum node '': input 'axes' must be an initializer" in _lint(model)
    k = _info("k", TensorProto.INT64, [1])
    topk = helper.make_node("TopK", ["x", "k"], ["y", "i"])
    indices = _info("i", TensorProto.INT64, None)
    assert "TopK node '': input 'K' must be a constant below 3840 (not an initializer here)" in _lint(
        _model([topk], [X, k], [Y, indices])
    )
    too_many = _model([topk], [X], [Y, indices], [_const("k", [4096])])
    assert "TopK node '': input 'K' must be below 3840" in _lint(too_many)


def test_unsupported_attribute_values() -> None:
    topk = helper.make_node("TopK", ["x", "k"], ["y", "i"], sorted=0)
    model = _model([topk], [X], [Y, _info("i", TensorProto.INT64, None)], [_const("k", [2])])
    assert _lint(model) == ["TopK node '': attribute sorted=0 is unsupported (allowed: [1])"]
    scatter = helper.make_node("ScatterND", ["x", "idx", "upd"], ["y"], reduction="add")
    inits = [_const("idx", [[0], [1]]), _const("upd", [[1.0] * 4] * 2, "float32")]
    assert _lint(_model([scatter], [X], [Y], inits)) == [
        "ScatterND node '': attribute reduction='add' is unsupported (allowed: ['none'])"
    ]
    plain = helper.make_node("ScatterND", ["x", "idx", "upd"], ["y"])
    assert _lint(_model([plain], [X], [Y], inits)) == []


def test_an_opset_outside_the_parsers_range() -> None:
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [X], [Y], opset=21)
    assert _lint(model) == ["opset 21: TensorRT 10.1 parses opsets 9 to 20"]


def test_profiles_must_cover_every_dynamic_dimension() -> None:
    a = _info("a", TensorProto.FLOAT, ["batch", 3, "seq"])
    b = _info("b", TensorProto.INT64, ["batch"])
    model = _model([helper.make_node("Identity", ["a"], ["y"])], [a, b], [Y])
    good = {"a": ((1, 3, 1), (2, 3, 8), (4, 3, 16)), "b": ((1,), (2,), (4,))}
    assert profile_problems(model, [good]) == []
    assert profile_problems(model, []) == [
        "input 'a' has dynamic dimensions and no profile covers them",
        "input 'b' has dynamic dimensions and no profile covers them",
    ]
    assert profile_problems(model, [{"a": good["a"]}]) == [
        "profile 0: no shapes for input 'b', which has dynamic dimensions"
    ]
    assert profile_problems(model, [{**good, "c": good["b"]}]) == ["profile 0: names 'c', which is not a graph input"]
    assert profile_problems(model, [{**good, "b": ((1,), (2,))}]) == [
        "profile 0: input 'b' needs 3 shapes (min, opt, max) of rank 1"
    ]
    assert profile_problems(model, [{**good, "a": ((1, 3, 1), (2, 4, 8), (4, 4, 16))}]) == [
        "profile 0: input 'a' axis 1: static 3 in the graph, the profile gives 3, 4, 4"
    ]
    assert profile_problems(model, [{**good, "a": ((1, 3, 9), (2, 3, 8), (4, 3, 16))}]) == [
        "profile 0: input 'a' axis 2: needs 0 <= min <= opt <= max, got 9, 8, 16"
    ]
    assert profile_problems(model, [good, {**good, "b": ((1,), (2,), (8,))}]) == [
        "profile 1: input 'b' axis 0 ('batch'): (1, 2, 8) here, (1, 2, 4) in input 'a'"
    ]
