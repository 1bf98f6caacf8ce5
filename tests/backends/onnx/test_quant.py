"""`--quantization` on the onnx backend: the contrib kernels' weight layouts against `dequantize()`, which
tensors the graph quantizes, logits against the torch backend with the same quantization, the export cache key,
and serving through `LLM`."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from ernie_serve.backends.onnx.backend import OnnxBackend, OnnxOptions  # noqa: E402
from ernie_serve.backends.onnx.export import ExportOptions, export_key, export_to_dir, qmoe_supported  # noqa: E402
from ernie_serve.backends.onnx.graph import (  # noqa: E402
    MASKED,
    MS_DOMAIN,
    GraphQuantization,
    matmul_nbits_inputs,
    past_names,
    save_graph,
)
from ernie_serve.backends.onnx.quant_bench import dynamic_quantize_matmul_inputs  # noqa: E402
from ernie_serve.models import num_parameters, read_model_config  # noqa: E402
from ernie_serve.ort_contrib import qmoe_router_weights_supported  # noqa: E402
from ernie_serve.quantization import QuantSpec, dequantize, quantize  # noqa: E402

# MatMulNBits carries both schemes: wint4 in its three groupings, wint8 per channel (blocks of 128)
NBITS_SPECS = [QuantSpec("wint4", 128), QuantSpec("wint4", 64), QuantSpec("wint4", 0), QuantSpec("wint8")]


def _one_node_session(node: onnx.NodeProto, k: int, n: int, initializers: list[onnx.TensorProto]):
    graph = helper.make_graph(
        [node],
        "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        initializer=initializers,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _matmul_nbits(weight: np.ndarray, quant: GraphQuantization):
    n, k = weight.shape
    packed, scales = matmul_nbits_inputs(weight, quant)
    node = helper.make_node(
        "MatMulNBits", ["x", "B", "s"], ["y"], domain=MS_DOMAIN, **quant.matmul_nbits_attributes(k, n)
    )
    return _one_node_session(node, k, n, [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "s")])


def _problem(k: int, n: int, rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator) * 0.05  # [N, K]
    x = torch.randn(rows, k, generator=generator)  # [M, K]
    return weight.numpy(), x.numpy()


@pytest.mark.parametrize("spec", NBITS_SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("k", [96, 256, 200])  # one short block; whole blocks; a padded last block
def test_matmul_nbits_layout_is_the_dequantized_weight(spec: QuantSpec, k: int) -> None:
    """With accuracy_level 0 the kernel computes in float32 with the weight it decodes from our B, scales and
    its default zero point, so it equals a float32 product with `dequantize()`'s weight up to summation order:
    any misplaced nibble, code, block or scale would be off by the size of a weight."""
    weight, x = _problem(k, 48, rows=5)
    session = _matmul_nbits(weight, GraphQuantization(spec, accuracy_level=0))
    expected = x @ dequantize(*quantize(torch.from_numpy(weight), spec), spec).numpy().T  # [M, N]
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=0, atol=1e-5)


def _swapped_pairs(weight: np.ndarray) -> np.ndarray:
    """`weight` [N, K] with input channels 2j and 2j+1 swapped: what a nibble-order mistake would compute with."""
    n, k = weight.shape
    return weight.reshape(n, k // 2, 2)[:, :, ::-1].reshape(n, k)


def _activation_bound(x: np.ndarray, dequantized: np.ndarray, block: int, levels: int, per_block: bool) -> np.ndarray:
    """An upper bound `[M, N]` on how far a kernel that rounds each activation to a grid of `levels` steps may
    move `x @ W^T`: each rounded activation moves by at most one step (half a step when rounded to nearest;
    one leaves room for the kernel's own rounding), and that error reaches output n weighted by |W[n, k]|.
    The step is `max|x| / levels` per block of `block` activations (per_block, symmetric int8) or
    `(max x - min x) / levels` over the whole tensor (asymmetric uint8)."""
    m, k = x.shape
    abs_w = np.abs(dequantized)  # [N, K]
    if not per_block:  # one scale for the whole input tensor, its range widened to include 0
        step = (max(x.max(), 0) - min(x.min(), 0)) / levels
        return np.broadcast_to(step * abs_w.sum(1)[None, :], (m, dequantized.shape[0]))
    bound = np.zeros((m, dequantized.shape[0]))
    for start in range(0, k, block):
        step = np.abs(x[:, start : start + block]).max(1) / levels  # [M]
        bound += step[:, None] * abs_w[:, start : start + block].sum(1)[None, :]
    return bound


@pytest.mark.parametrize("spec", NBITS_SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("rows", [1, 16])
def test_matmul_nbits_fast_path_errs_only_by_its_int8_activations(spec: QuantSpec, rows: int) -> None:
    """accuracy_level 4 (what the export uses) also rounds the activations to int8 per block; with the same
    weights, its result stays within that rounding's bound of the float32 product with `dequantize()`'s
    weight, and that bound is too loose for nothing: a product with swapped nibbles falls outside it."""
    quant = GraphQuantization(spec)
    weight, x = _problem(256, 64, rows)
    dequantized = dequantize(*quantize(torch.from_numpy(weight), spec), spec).numpy()  # [N, K]
    got = _matmul_nbits(weight, quant).run(None, {"x": x})[0]
    expected = x @ dequantized.T
    bound = _activation_bound(x, dequantized, quant.block_size(), 127, per_block=True)
    assert np.all(np.abs(got - expected) <= bound + 1e-5)
    assert np.abs(got - expected).max() > 0  # it really rounds: the exact test above is not this one
    assert np.mean(np.abs(x @ _swapped_pairs(dequantized).T - expected) > bound) > 0.5


@pytest.mark.parametrize("rows", [1, 16])
def test_dynamic_quantize_matmul_is_the_dequantized_wint8_weight_with_uint8_activations(rows: int) -> None:
    """DynamicQuantizeMatMul on our uint8 codes (zero point 128) equals the float32 product with `dequantize()`'s
    wint8 weight within the bound of rounding the activations to uint8 (one scale per tensor): whole 8-bit codes, no
    saturation (int8 codes in onnxruntime's u8s8 path on AVX2 exceed this bound). A weight with swapped input
    channels falls outside it."""
    weight, x = _problem(256, 64, rows)
    codes, scales, zero_point = dynamic_quantize_matmul_inputs(weight)
    assert codes.dtype == np.uint8 and codes.shape == (256, 64) and scales.shape == zero_point.shape == (64,)
    node = helper.make_node("DynamicQuantizeMatMul", ["x", "B", "s", "z"], ["y"], domain=MS_DOMAIN)
    arrays = {"B": codes, "s": scales, "z": zero_point}
    session = _one_node_session(node, 256, 64, [numpy_helper.from_array(a, name) for name, a in arrays.items()])
    spec = QuantSpec("wint8")
    dequantized = dequantize(*quantize(torch.from_numpy(weight), spec), spec).numpy()
    expected = x @ dequantized.T
    got = session.run(None, {"x": x})[0]
    bound = _activation_bound(x, dequantized, 256, 255, per_block=False)
    assert np.all(np.abs(got - expected) <= bound + 1e-5)
    assert np.mean(np.abs(x @ _swapped_pairs(dequantized).T - expected) > bound) > 0.5


# ----- the exported graph -----


def _export(checkpoint, quant: GraphQuantization | None, out):
    """The tiny checkpoint's graph with `quant`, and an onnxruntime session on it."""
    from ernie_serve.backends.onnx.export import build_torch_model

    config = read_model_config(checkpoint)
    model = build_torch_model(config, str(checkpoint), 0)
    save_graph(config, dict(model.checkpoint_targets()), out, "model.onnx", quant)
    return config, ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])


def _prefill_logits(session, config, tokens: list[int]) -> np.ndarray:
    """Logits `[V]` after one sequence's prompt, as one graph run."""
    return _batch_prefill_logits(session, config, [tokens])[0]


def _batch_prefill_logits(session, config, prompts: list[list[int]]) -> np.ndarray:
    """Logits `[B, V]` after each prompt (all of one length), the prompts batched in one graph run."""
    b, n = len(prompts), len(prompts[0])
    feed = {
        "input_ids": np.array(prompts),
        "position_ids": np.tile(np.arange(n), (b, 1)),
        "attention_bias": np.tile(np.triu(np.full((n, n), MASKED, np.float32), 1), (b, 1, 1)),
        "logits_index": np.full(b, n - 1),
    }
    empty = np.zeros((b, config.num_key_value_heads, 0, config.head_dim), np.float32)
    for layer in range(config.num_hidden_layers):
        for name in past_names(layer):
            feed[name] = empty
    return session.run(["logits"], feed)[0]


@torch.inference_mode()
def _torch_logits(checkpoint, spec: QuantSpec, lm_head: bool, tokens: list[int]) -> np.ndarray:
    """The torch backend's quantized model, loaded as the backend loads it, on the same prompt as one prefill
    (weight-only: its several-row path multiplies by the dequantized weights in float32)."""
    from ernie_serve.backends.torch.loader import load_safetensors
    from ernie_serve.backends.torch.model import ErnieForCausalLM
    from ernie_serve.bench.quantization import teacher_forced_logits

    config = read_model_config(checkpoint)
    model = ErnieForCausalLM(config, torch.float32, torch.device("cpu"), quantization=spec, quantize_lm_head=lm_head)
    load_safetensors(model.eval(), checkpoint)
    model.quantize_tied_lm_head()
    return teacher_forced_logits(model, torch.tensor(tokens))[-1].numpy()  # [V] after the last token


TOKENS = [5, 77, 300, 41, 9, 123, 250, 18, 64, 400, 3, 99]
# shape, spec, LM head quantized, routed experts as QMoE nodes, QMoE given ERNIE's weights (`router_weights`)
GRAPH_CASES = {
    "moe_shared_tied wint4 g128": ("moe_shared_tied", QuantSpec("wint4", 128), True, False, False),
    "moe_interval2_untied_mqa wint4 g64": ("moe_interval2_untied_mqa", QuantSpec("wint4", 64), True, False, False),
    "dense_bias_headdim wint4 per-channel fp32 head": (
        "dense_bias_headdim",
        QuantSpec("wint4", 0),
        False,
        False,
        False,
    ),
    "moe_top1_dense_tail wint4 g128 fp32 head": ("moe_top1_dense_tail", QuantSpec("wint4", 128), False, False, False),
    # wint8 through MatMulNBits: exact at accuracy_level 0 with the experts unrolled (QMoE's 8-bit experts round
    # their activations at every level)
    "moe_shared_tied wint8": ("moe_shared_tied", QuantSpec("wint8"), True, False, False),
    "dense_bias_headdim wint8 fp32 head": ("dense_bias_headdim", QuantSpec("wint8"), False, False, False),
    # QMoE: per-channel scales over blocks of 32 (shared experts beside it) and of 16 (top-1, a dense tail)
    "moe_shared_tied wint4 per-channel QMoE": ("moe_shared_tied", QuantSpec("wint4", 0), True, True, True),
    "moe_top1_dense_tail wint4 per-channel QMoE": ("moe_top1_dense_tail", QuantSpec("wint4", 0), False, True, True),
    "moe_interval2_untied_mqa wint4 per-channel QMoE": (
        "moe_interval2_untied_mqa",
        QuantSpec("wint4", 0),
        True,
        True,
        True,
    ),  # fmt: skip
    # QMoE with groups of 64 along K: a tiny shape whose hidden and expert widths are multiples of 64
    "moe_g64 wint4 g64 QMoE": ("moe_g64", QuantSpec("wint4", 64), True, True, True),
    # QMoE given masked logits, as on an onnxruntime whose QMoE has no router_weights input
    "moe_shared_tied wint4 per-channel QMoE masked logits": (
        "moe_shared_tied",
        QuantSpec("wint4", 0),
        True,
        True,
        False,
    ),
    "moe_g64 wint4 g64 QMoE masked logits": ("moe_g64", QuantSpec("wint4", 64), True, True, False),
}


@pytest.fixture(scope="module")
def graph_checkpoint(tiny_checkpoint, tmp_path_factory):
    """`graph_checkpoint(shape)`: a tiny checkpoint, or `moe_g64` (hidden 128, experts 64 wide: the widths
    QMoE's groups of 64 divide, which the tiny shapes' are not)."""

    def make(shape: str):
        if shape != "moe_g64":
            return tiny_checkpoint(shape, torch.bfloat16)
        from ernie_serve.core.config import ModelConfig
        from ernie_serve.demo import write_random_checkpoint

        out = tmp_path_factory.mktemp("moe_g64")
        config = ModelConfig(
            model_type="ernie4_5_moe", vocab_size=512, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, moe_intermediate_size=64, moe_k=2,
            moe_num_experts=4, moe_num_shared_experts=1, moe_layer_start_index=1, tie_word_embeddings=True,
        )  # fmt: skip
        write_random_checkpoint(out, config, seed=3, dtype=torch.bfloat16, std=0.1)
        return out

    return make


@pytest.mark.parametrize("case", list(GRAPH_CASES))
def test_exact_kernels_give_the_torch_backends_quantized_logits(case: str, graph_checkpoint, tmp_path) -> None:
    """With MatMulNBits and QMoE computing in float32 (accuracy_level 0), the graph is the torch backend's
    weight-only quantized model exactly, up to float32 summation order: the same tensors quantized (fused or
    not, experts, shared experts, LM head or not), the same codes and scales, and QMoE's own routing given
    ERNIE's choice (biased selection, unbiased weights: given as they are, or as masked logits). A tensor
    quantized on one side only would move the logits by about the quantization error itself, 1e-2 and more
    here."""
    shape, spec, lm_head, fused_moe, router_weights = GRAPH_CASES[case]
    if fused_moe and not qmoe_supported():
        pytest.skip("this onnxruntime has no CPU QMoE with float32 activations")
    if router_weights and not qmoe_router_weights_supported():
        pytest.skip("this onnxruntime's QMoE has no router_weights input")
    checkpoint = graph_checkpoint(shape)
    quant = GraphQuantization(spec, lm_head, accuracy_level=0, fused_moe=fused_moe, router_weights=router_weights)
    config, session = _export(checkpoint, quant, tmp_path)
    if fused_moe:
        model = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
        qmoe = [n for n in model.graph.node if n.op_type == "QMoE"]
        assert len(qmoe) == sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
        assert all((len(n.input) > 14 and n.input[14] != "") is router_weights for n in qmoe)
    expected = _torch_logits(checkpoint, spec, lm_head, TOKENS)
    np.testing.assert_allclose(_prefill_logits(session, config, TOKENS), expected, rtol=0, atol=2e-4)
    unquantized = _torch_logits(checkpoint, spec, not lm_head, TOKENS)  # the head the other way
    assert np.abs(unquantized - expected).max() > 20 * 2e-4


@pytest.mark.parametrize("scheme", ["wint4", "wint8"])
def test_fast_kernels_stay_near_the_torch_backends_quantized_logits(scheme: str, tiny_checkpoint, tmp_path) -> None:
    """The exported kernels (MatMulNBits accuracy_level 4, 4- or 8-bit) also round activations to 8 bits per
    block: per product at most a few 1e-3 of its size (the bounds above), so after the tiny model's
    layers the logits stay within a few percent of their spread, and the greedy token mostly agrees."""
    checkpoint = tiny_checkpoint("moe_shared_tied", torch.bfloat16)
    spec = QuantSpec.of(scheme, 128)
    config, session = _export(checkpoint, GraphQuantization(spec), tmp_path)
    got, expected = _prefill_logits(session, config, TOKENS), _torch_logits(checkpoint, spec, True, TOKENS)
    assert np.abs(got - expected).max() < 0.05 * (expected.max() - expected.min())
    assert np.abs(got - expected).max() > 1e-5  # it is not the exact path


@pytest.mark.parametrize("scheme", ["wint4", "wint8"])
def test_a_prompts_quantized_logits_do_not_depend_on_the_prompts_batched_with_it(
    scheme: str, tiny_checkpoint, tmp_path
) -> None:
    """The default export rounds each row's activations on their own (per row and block), so a prompt's
    logits are the same alone and batched with others, up to float32 summation order. wint8's kernel before,
    `DynamicQuantizeMatMul`, rounded each call's whole input with one scale: the other rows moved a row's
    logits (by up to 1.4 on the CPU benchmark model)."""
    checkpoint = tiny_checkpoint("moe_shared_tied", torch.bfloat16)
    config = read_model_config(checkpoint)
    export_to_dir(config, str(checkpoint), tmp_path, options=ExportOptions(quantization=QuantSpec.of(scheme, 128)))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    others = [[(7 * t + 11) % config.vocab_size for t in TOKENS], [config.vocab_size - 1] * len(TOKENS)]
    alone = _prefill_logits(session, config, TOKENS)
    batched = _batch_prefill_logits(session, config, [TOKENS, *others])
    np.testing.assert_allclose(batched[0], alone, rtol=0, atol=1e-5)
    assert np.abs(batched[1] - alone).max() > 0.1  # the other rows are different prompts


@pytest.mark.parametrize("fused_moe", [False, True])
def test_the_quantized_graph_quantizes_what_the_torch_backend_does(fused_moe: bool, tiny_checkpoint, tmp_path) -> None:
    """Every attention projection, dense MLP, routed and shared expert is one quantized product (or, with
    `fused_moe`, each MoE layer's routed experts one QMoE node with uint8 codes); the router, embedding and
    norms stay float32 (their MatMul / Gather / Mul read float32 initializers)."""
    if fused_moe and not qmoe_supported():
        pytest.skip("this onnxruntime has no CPU QMoE with float32 activations")
    checkpoint = tiny_checkpoint("moe_top1_dense_tail", torch.bfloat16)
    config = read_model_config(checkpoint)
    for spec in (QuantSpec("wint4", 0), QuantSpec("wint8")):
        out = tmp_path / spec.scheme
        options = ExportOptions(quantization=spec, fused_moe=fused_moe)
        stats = export_to_dir(config, str(checkpoint), out, options=options)
        model = onnx.load(str(out / "model.onnx"), load_external_data=False)
        ops = Counter(n.op_type for n in model.graph.node)
        moe = [config.is_moe_layer(i) for i in range(config.num_hidden_layers)]
        routed = 0 if fused_moe else config.moe_num_experts
        mlps = sum(routed + config.moe_num_shared_experts if m else 1 for m in moe)
        # per layer qkv (fused) + o, per MLP gate_up (fused) + down, and the LM head
        assert ops["MatMulNBits"] == 2 * config.num_hidden_layers + 2 * mlps + 1
        bits = {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
        assert bits == {spec.bits}
        assert ops["QMoE"] == (sum(moe) if fused_moe else 0)
        initializers = {t.name: t for t in model.graph.initializer}
        for node in (n for n in model.graph.node if n.op_type == "QMoE"):
            fc1, fc2 = initializers[node.input[2]], initializers[node.input[5]]
            assert fc1.data_type == fc2.data_type == TensorProto.UINT8
            e, h, inter = config.moe_num_experts, config.hidden_size, config.moe_intermediate_size
            per_byte = 8 // spec.bits
            assert list(fc1.dims) == [e, 2 * inter, h // per_byte]
            assert list(fc2.dims) == [e, h, inter // per_byte]
        float_matmuls = {n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
        assert {w for w in float_matmuls if w.startswith("model.")} == {
            f"model.layers.{i}.mlp.gate.weight" for i, m in enumerate(moe) if m
        }
        assert initializers["model.embed_tokens.weight"].data_type == TensorProto.FLOAT
        tied_copy = config.vocab_size * config.hidden_size  # the quantized head beside the float32 embedding
        assert stats.num_parameters == pytest.approx(num_parameters(config) + tied_copy, rel=0.01)
        assert {d.domain for d in model.opset_import} == {"", MS_DOMAIN}
        onnx.checker.check_model(str(out / "model.onnx"))


def test_the_export_cache_key_tells_schemes_group_sizes_and_heads_apart(tiny_checkpoint) -> None:
    checkpoint = tiny_checkpoint("moe_shared_tied", torch.bfloat16)
    config = read_model_config(checkpoint)
    options = [
        ExportOptions(),
        ExportOptions(quantization=QuantSpec("wint8")),
        ExportOptions(quantization=QuantSpec("wint4", 128)),
        ExportOptions(quantization=QuantSpec("wint4", 64)),
        ExportOptions(quantization=QuantSpec("wint4", 0)),
        ExportOptions(quantization=QuantSpec("wint4", 128), quantize_lm_head=False),
        ExportOptions(quantization=QuantSpec("wint4", 128), weight_only=True),
        ExportOptions(quantization=QuantSpec("wint4", 128), fused_moe=not qmoe_supported()),
        ExportOptions(quantization=QuantSpec("wint4", 128), qmoe_router_weights=not qmoe_router_weights_supported()),
    ]
    keys = [export_key(config, str(checkpoint), 0, o)[0] for o in options]
    assert len(set(keys)) == len(keys)
    assert export_key(config, str(checkpoint), 0, options[2])[0] == keys[2]  # and stable


def test_qmoe_is_found_on_onnxruntimes_process_wide_pool() -> None:
    """Once the torch backend has made onnxruntime's process-wide thread pool (`share_thread_pool`), onnxruntime
    refuses sessions with pools of their own; the QMoE probe must run on that pool, not conclude that QMoE is
    missing. In a fresh interpreter, so this process keeps its own pools."""
    code = (
        "from ernie_serve.backends.torch.ort_kernels import share_thread_pool\n"
        "share_thread_pool(1)\n"
        "from ernie_serve.backends.onnx.export import qmoe_supported\n"
        "print(qmoe_supported())\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert run.stdout.strip().splitlines()[-1] == str(qmoe_supported())


def test_capabilities_and_quantization_options() -> None:
    assert OnnxBackend.capabilities.quantization == ("wint8", "wint4")
    assert OnnxOptions().onnx_quantize_lm_head is True and OnnxOptions().onnx_weight_only is False
    assert ExportOptions(quantization=QuantSpec("wint4", 64), weight_only=True).graph_quantization() == (
        GraphQuantization(
            QuantSpec("wint4", 64), accuracy_level=0, fused_moe=qmoe_supported(),
            router_weights=qmoe_router_weights_supported(),
        )
    )  # fmt: skip
    # QMoE only in quantized onnxruntime graphs, and only where onnxruntime runs it
    assert ExportOptions().fused_moe is False
    assert ExportOptions(quantization=QuantSpec("wint8")).fused_moe is qmoe_supported()
    assert ExportOptions(quantization=QuantSpec("wint8"), fused_moe=False).graph_quantization().fused_moe is False
    assert ExportOptions(quantization=QuantSpec("wint8"), fused_moe=False).qmoe_router_weights is False
    # weight-only wint8 unrolls the experts: QMoE's 8-bit experts round their activations at every level
    assert ExportOptions(quantization=QuantSpec("wint8"), weight_only=True).graph_quantization() == (
        GraphQuantization(QuantSpec("wint8"), accuracy_level=0, fused_moe=False)
    )


def test_export_command_writes_a_quantized_graph(tiny_checkpoint, tmp_path) -> None:
    import io

    from ernie_serve.backends.onnx.export import export_command

    checkpoint = tiny_checkpoint("moe_shared_tied", torch.bfloat16)
    out, err = io.StringIO(), io.StringIO()
    code = export_command(
        str(checkpoint), str(tmp_path), out=out, err=err, quantization="wint4", quantization_group_size=64
    )
    assert code == 0, err.getvalue()
    assert "com.microsoft (onnxruntime only)" in out.getvalue()
    assert "wint4 (groups of 64)-quantized" in out.getvalue() and "(LM head quantized)" in out.getvalue()
    model = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert {a.i for n in nbits for a in n.attribute if a.name == "block_size"} == {64}


@pytest.mark.parametrize(
    ("scheme", "group_size", "lm_head"), [("wint4", 128, True), ("wint4", -1, False), ("wint8", 128, True)]
)
def test_llm_serves_a_quantized_export(scheme, group_size, lm_head, tiny_checkpoint, tmp_path, monkeypatch) -> None:
    """`LLM(backend="onnx", quantization=...)` exports into the cache once per variant, serves it and reports
    its weight bytes by kind. (Greedy tokens against a reference, with the near-tie tolerance that activation
    rounding needs, are the conformance suite's: test_quant_conformance.py.)"""
    from ernie_serve import LLM, SamplingParams

    monkeypatch.setenv("ERNIE_SERVE_CACHE", str(tmp_path / "cache"))
    checkpoint = tiny_checkpoint("moe_shared_tied", torch.bfloat16)
    prompts = ["hello world, how are", "the quick brown fox jumps"]
    params = SamplingParams(max_tokens=6, temperature=0)
    settings = {"quantization": scheme, "quantization_group_size": group_size, "device": "cpu"}
    with LLM(model=str(checkpoint), backend="onnx", onnx_quantize_lm_head=lm_head, **settings) as llm:
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        weight_bytes = llm.engine.weight_bytes
    assert all(len(t) == 6 for t in tokens)
    assert len(list((tmp_path / "cache" / "onnx").iterdir())) == 1
    assert weight_bytes["quantized"] > 0 and weight_bytes["full_precision"] > 0


def test_the_accuracy_benchmark_decodes_what_one_prefill_computes(tiny_checkpoint, tmp_path) -> None:
    """`bench quantization --backend onnx` feeds one token per run with the growing cache: at each position
    that must be the logits a prefill of the same prefix gives (float32 graph: up to summation order)."""
    from ernie_serve.backends.onnx.quant_bench import decode_logits

    checkpoint = tiny_checkpoint("moe_interval2_untied_mqa", torch.bfloat16)
    config, session = _export(checkpoint, None, tmp_path)
    decoded = decode_logits(session, config, torch.tensor(TOKENS)).numpy()  # [T, V]
    assert decoded.shape == (len(TOKENS), config.vocab_size)
    for n in (1, 5, len(TOKENS)):
        np.testing.assert_allclose(decoded[n - 1], _prefill_logits(session, config, TOKENS[:n]), rtol=0, atol=1e-4)
