"""onnxruntime's `MatMulNBits` as the torch backend's CPU kernel (`--cpu-quantized-kernels`): the product
against the dequantized weights within the bound of its int8 activation rounding, which matrices `auto` sends to
it, and a model served on it."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from ernie_serve import LLM, SamplingParams
from ernie_serve.backends.torch import backend as torch_backend
from ernie_serve.backends.torch import ort_kernels
from ernie_serve.backends.torch.model import MLP, SparseMoE, rope_interleaved
from ernie_serve.backends.torch.ort_kernels import (
    AttentionInputKernel,
    AttentionInputParts,
    FusedMLPKernel,
    FusedPart,
    KernelSession,
    MLPLayerKernel,
    MoELayerKernel,
    MoELayerParts,
    NBitsKernel,
    NormedHeadKernel,
    RoutedExpertsKernel,
    experts_run_as_qmoe,
    fits_one_session,
    uses_onnxruntime,
)
from ernie_serve.backends.torch.quant import Int4Kernel, QuantizedWeight
from ernie_serve.core.backend import BackendUnavailableError
from ernie_serve.ort_contrib import qmoe_router_weights_supported, qmoe_supported
from ernie_serve.quantization import NBITS_PER_CHANNEL_BLOCK, QuantSpec, dequantize, qmoe_block, quantize

pytest.importorskip("onnxruntime", reason="the test extra installs onnxruntime")

SPECS = [QuantSpec("wint4", 128), QuantSpec("wint4", 64), QuantSpec("wint4"), QuantSpec("wint8")]
IDS = [s.describe() for s in SPECS]


@pytest.fixture(autouse=True)
def torch_threads():
    """A model whose weights onnxruntime holds sets torch to one thread (`_hand_cores_to_onnxruntime`):
    give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield threads
    torch.set_num_threads(threads)


def _kernel_and_weight(spec: QuantSpec, in_features: int, out_features: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05  # [out, in]
    codes, scales = quantize(weight, spec)  # [out, in], [out, G]
    kernel = NBitsKernel.pack(lambda columns: codes[columns], scales.t().contiguous(), spec, in_features)
    return kernel, dequantize(codes, scales, spec)  # the kernel, the `[out, in]` weight it stands for


def _activation_rounding_bound(x: torch.Tensor, weight: torch.Tensor, block: int) -> torch.Tensor:
    """`accuracy_level=4` rounds each row of x to int8 per block of `block` inputs (scale max|x| / 127): each
    input moves by at most half a step, so output n moves by at most the sum over blocks of half the block's
    step times the block's |W[n, i]|. Returns that bound `[T, out]`."""
    rows, k = x.shape
    blocks = -(-k // block)
    padded = torch.nn.functional.pad(x, (0, blocks * block - k)).view(rows, blocks, block)
    half_steps = padded.abs().amax(-1) / 127 / 2  # [T, blocks]
    w = torch.nn.functional.pad(weight.abs(), (0, blocks * block - k)).view(-1, blocks, block).sum(-1)  # [out, blocks]
    return half_steps @ w.t()  # [T, out]


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("in_features", [256, 200])
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_product_is_the_dequantized_one_within_its_activation_rounding(
    spec: QuantSpec, in_features: int, rows: int
) -> None:
    kernel, weight = _kernel_and_weight(spec, in_features, 96)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(1))
    reference = x @ weight.t()  # [rows, 96]
    out = kernel.matmul(x)
    assert out.shape == reference.shape and out.dtype == torch.float32
    bound = _activation_rounding_bound(x, weight, spec.group_size or NBITS_PER_CHANNEL_BLOCK)
    assert ((out - reference).abs() <= bound * 1.05 + 1e-5).all()
    assert not torch.equal(out, reference)  # it does round: the bound is the right yardstick, not 1e-6


def test_a_nibble_swapped_weight_is_outside_the_bound(monkeypatch) -> None:
    """The bound above is tight enough to catch a packing error: the same codes with the two nibbles of each
    byte swapped (the classic mistake in this layout) miss it by far."""
    spec = QuantSpec("wint4", 128)

    def swapped(codes, scales, spec):
        packed, block_scales, block = matmul_nbits_layout(codes, scales, spec)
        return (packed >> 4) | (packed << 4), block_scales, block

    matmul_nbits_layout = ort_kernels.matmul_nbits_layout
    monkeypatch.setattr(ort_kernels, "matmul_nbits_layout", swapped)
    kernel, weight = _kernel_and_weight(spec, 256, 96)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
    bound = _activation_rounding_bound(x, weight, 128)
    assert ((kernel.matmul(x) - x @ weight.t()).abs() > bound * 1.05 + 1e-5).float().mean() > 0.5


def test_a_matrix_in_pieces_multiplies_like_one_session(monkeypatch) -> None:
    """Past `PIECE_WEIGHTS` a matrix is packed as sessions over ranges of output columns (even widths)."""
    spec = QuantSpec("wint4", 64)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    whole, _ = _kernel_and_weight(spec, 128, 100)
    monkeypatch.setattr(ort_kernels, "PIECE_WEIGHTS", 128 * 30)
    pieces, _ = _kernel_and_weight(spec, 128, 100)
    assert len(whole.sessions) == 1 and len(pieces.sessions) == 4
    assert ort_kernels._pieces(100, 128) == [(0, 26), (26, 52), (52, 78), (78, 100)]
    assert torch.allclose(pieces.matmul(x), whole.matmul(x), rtol=1e-5, atol=1e-6)  # (tiling may reorder sums)


def _quantized(spec: QuantSpec, in_features: int, out_features: int, seed: int):
    """Codes `[out, in]` and scales `[G, out]` of a random matrix, and the `[out, in]` weight they stand for."""
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.05
    codes, scales = quantize(weight, spec)  # [out, in], [out, G]
    return (codes, scales.t().contiguous()), dequantize(codes, scales, spec)


@pytest.mark.parametrize("spec", [QuantSpec("wint4", 128), QuantSpec("wint4"), QuantSpec("wint8")], ids=str)
def test_a_fused_mlp_is_its_two_kernels_with_silu_between(spec: QuantSpec) -> None:
    hidden, intermediate = 256, 192
    gate_up, gate_up_weight = _quantized(spec, hidden, 2 * intermediate, seed=0)  # [2I, H]
    down, down_weight = _quantized(spec, intermediate, hidden, seed=1)  # [H, I]
    fused = FusedMLPKernel.pack(gate_up, down, spec)
    gate_up_kernel = NBitsKernel.pack(lambda c: gate_up[0][c], gate_up[1], spec, hidden)
    down_kernel = NBitsKernel.pack(lambda c: down[0][c], down[1], spec, intermediate)
    x = torch.randn(3, hidden, generator=torch.Generator().manual_seed(2))
    g, u = gate_up_kernel.matmul(x).chunk(2, dim=1)  # [T, I] each
    two_calls = down_kernel.matmul(torch.nn.functional.silu(g) * u)  # [T, H]
    out = fused.forward(x)
    # the same products; SiLU in onnxruntime and in torch may differ in the last bit, and that bit can move an
    # int8 rounding of the down projection's input by one step
    assert torch.allclose(out, two_calls, rtol=0, atol=1e-3 * two_calls.abs().max())
    g, u = (x @ gate_up_weight.t()).chunk(2, dim=1)
    exact = (torch.nn.functional.silu(g) * u) @ down_weight.t()
    swapped = (torch.nn.functional.silu(u) * g) @ down_weight.t()  # up and gate the other way round
    error = (out - exact).abs().max()
    assert error < 0.05 * exact.abs().max() and error < (swapped - exact).abs().max() / 4
    assert fused.forward(x[:0]).shape == (0, hidden)


@pytest.mark.parametrize("spec", [QuantSpec("wint4", 64), QuantSpec("wint4"), QuantSpec("wint8")], ids=str)
def test_routed_experts_in_one_qmoe_session_are_the_chosen_experts_weighted(spec: QuantSpec) -> None:
    """`RoutedExpertsKernel`: each token's chosen experts, weighted by the router's softmax renormalized over
    them (ERNIE's weights): the same sums as `FusedMLPKernel`s where both round the activations alike, and
    within 5% of the dequantized float32 math everywhere, where routing to other experts is off by 100%."""
    if not qmoe_supported():
        pytest.skip("this onnxruntime has no QMoE as the kernel uses it (the model then keeps one session an expert)")
    num_experts, top_k, hidden, intermediate, tokens = 5, 2, 128, 64, 7
    block = qmoe_block(spec, hidden, intermediate)
    assert block is not None
    experts, weights = [], []
    for e in range(num_experts):
        gate_up, gate_up_weight = _quantized(spec, hidden, 2 * intermediate, seed=2 * e)  # [2I, H]
        down, down_weight = _quantized(spec, intermediate, hidden, seed=2 * e + 1)  # [H, I]
        experts.append((gate_up, down))
        weights.append((gate_up_weight, down_weight))
    kernel = RoutedExpertsKernel.pack(iter(experts), num_experts, spec, top_k, block)
    per_expert = [FusedMLPKernel.pack(gate_up, down, spec) for gate_up, down in experts]
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(tokens, hidden, generator=generator)
    logits = torch.randn(tokens, num_experts, generator=generator)  # [T, E]
    chosen = torch.topk(logits + torch.randn(num_experts, generator=generator), top_k, dim=-1).indices  # [T, k]
    routing = torch.softmax(logits, dim=-1).gather(1, chosen)  # [T, k]
    routing = routing / routing.sum(-1, keepdim=True)

    def exact_expert(e: int, rows: torch.Tensor) -> torch.Tensor:
        gate_up_weight, down_weight = weights[e]
        g, u = (rows @ gate_up_weight.t()).chunk(2, dim=1)
        return (torch.nn.functional.silu(g) * u) @ down_weight.t()

    def mixture(run_expert, experts_of: torch.Tensor) -> torch.Tensor:  # [T, H]
        rows = [
            sum(routing[t, j] * run_expert(int(experts_of[t, j]), x[t : t + 1])[0] for j in range(top_k))
            for t in range(tokens)
        ]
        return torch.stack(rows)

    out = kernel.forward(x, logits, chosen)  # [T, H]
    sessions = mixture(lambda e, rows: per_expert[e].forward(rows), chosen)
    exact = mixture(exact_expert, chosen)
    others = mixture(exact_expert, (chosen + 1) % num_experts)
    if spec.bits == 4 and spec.group_size:  # the same blocks, so the same rounding of the activations
        assert torch.allclose(out, sessions, rtol=0, atol=1e-5 * sessions.abs().max())
    # (one scale per channel: QMoE's block is the largest fitting both widths, 64 here, MatMulNBits' 128; 8-bit
    # experts round activations per block whatever the level: different roundings, each within the bound below)
    error = (out - exact).abs().max()
    assert error < 0.05 * exact.abs().max() and error < (others - exact).abs().max() / 4
    assert kernel.forward(x[:0], logits[:0], chosen[:0]).shape == (0, hidden)
    assert kernel.forward(x.to(torch.bfloat16), logits, chosen).dtype == torch.bfloat16


@pytest.mark.parametrize("spec", [QuantSpec("wint4", 64), QuantSpec("wint8")], ids=str)
@pytest.mark.parametrize("with_shared", [True, False], ids=["shared", "no-shared"])
@pytest.mark.parametrize("router_weights", [True, False], ids=["router-weights", "masked-logits"])
def test_a_moe_layer_in_one_session_is_its_norm_router_and_experts(
    spec: QuantSpec, with_shared: bool, router_weights: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`MoELayerKernel`: `h + shared(n) + routed(n)`, `n = rmsnorm(h)`, the same as the torch ops and the two
    sessions it replaces (`RoutedExpertsKernel`, `FusedMLPKernel`), with the correction bias choosing experts but
    not weighting them, whether `QMoE` is given both (`router_weights`) or masked logits (an onnxruntime without
    that input); without the residual on a tensor-parallel rank but the first."""
    if not qmoe_supported():
        pytest.skip("this onnxruntime has no QMoE as the kernel uses it (the model then keeps one session an expert)")
    if router_weights and not qmoe_router_weights_supported():
        pytest.skip("this onnxruntime's QMoE has no router_weights input (the kernel masks the logits instead)")
    monkeypatch.setattr(ort_kernels, "qmoe_router_weights_supported", lambda: router_weights)
    num_experts, top_k, hidden, intermediate, tokens = 6, 2, 128, 64, 9
    block = qmoe_block(spec, hidden, intermediate)
    assert block is not None
    experts = [
        (
            _quantized(spec, hidden, 2 * intermediate, seed=2 * e)[0],
            _quantized(spec, intermediate, hidden, 2 * e + 1)[0],
        )
        for e in range(num_experts)
    ]
    shared = (_quantized(spec, hidden, 4 * intermediate, seed=50)[0], _quantized(spec, 2 * intermediate, hidden, 51)[0])
    generator = torch.Generator().manual_seed(3)
    norm_weight = 1 + 0.2 * torch.randn(hidden, generator=generator)
    router_weight = torch.randn(num_experts, hidden, generator=generator) * 0.1  # [E, H]
    score_bias = torch.rand(num_experts, generator=generator) * 0.3  # as large as the probabilities: it changes choices
    parts = MoELayerParts(norm_weight, 1e-5, router_weight, score_bias, shared if with_shared else None)
    layer = MoELayerKernel.pack(iter(experts), num_experts, spec, top_k, block, parts)
    routed = RoutedExpertsKernel.pack(iter(experts), num_experts, spec, top_k, block)
    shared_kernel = FusedMLPKernel.pack(*shared, spec)
    h = torch.randn(tokens, hidden, generator=generator) * 3

    def in_torch(bias_weights: bool) -> torch.Tensor:
        n = torch.nn.functional.rms_norm(h, (hidden,), norm_weight, 1e-5)
        logits = n @ router_weight.t()  # [T, E]
        chosen = torch.topk(torch.softmax(logits, -1) + score_bias, top_k, dim=-1).indices
        if bias_weights:  # the mistake: weights from the biased scores
            logits = torch.log(torch.softmax(logits, -1) + score_bias)
        out = h + routed.forward(n, logits, chosen)
        return out + shared_kernel.forward(n) if with_shared else out

    expected, biased = in_torch(False), in_torch(True)
    out = layer.forward(h)  # [T, H]
    # (the norm in onnxruntime and in torch may differ in the last bit, which can move an int8 rounding one step)
    assert torch.allclose(out, expected, rtol=0, atol=1e-4 * expected.abs().max())
    assert (biased - expected).abs().max() > 100 * (out - expected).abs().max()
    partial = MoELayerKernel.pack(
        iter(experts), num_experts, spec, top_k, block, dataclasses.replace(parts, adds_residual=False)
    )
    assert torch.allclose(partial.forward(h), expected - h, rtol=0, atol=1e-4 * expected.abs().max())
    assert layer.forward(h[:0]).shape == (0, hidden)
    assert layer.forward(h.to(torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("spec", [QuantSpec("wint4", 64), QuantSpec("wint8")], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_an_attention_input_in_one_session_is_norm_projection_and_rope(spec: QuantSpec, with_bias: bool) -> None:
    """`AttentionInputKernel`: q rotated, and k rotated beside v (as the KV cache holds them), from the residual
    stream, the same as torch's norm, the projection's own session and `rope_interleaved` (pairs 2i, 2i+1, not
    halves) at each row's positions."""
    heads, kv_heads, head_dim, hidden, tokens = 4, 2, 32, 128, 7
    width = (heads + 2 * kv_heads) * head_dim
    qkv, _ = _quantized(spec, hidden, width, seed=5)  # codes [(Q+2K) D, H], scales [G, (Q+2K) D]
    generator = torch.Generator().manual_seed(6)
    norm_weight = 1 + 0.2 * torch.randn(hidden, generator=generator)
    bias = torch.randn(width, generator=generator) * 0.1 if with_bias else None
    kernel = AttentionInputKernel.pack(
        AttentionInputParts(norm_weight, 1e-5, qkv, bias, heads, kv_heads, head_dim), spec
    )
    projection = NBitsKernel.pack(lambda c: qkv[0][c], qkv[1], spec, hidden)
    x = torch.randn(tokens, hidden, generator=generator) * 3
    positions = torch.tensor([0, 1, 2, 40, 41, 7, 300])  # rows of several requests: any positions, in any order
    inv_freq = 1.0 / 10000 ** (torch.arange(head_dim // 2) * 2 / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
    rotation = torch.polar(torch.ones_like(angles), angles).unsqueeze(1)  # [T, 1, D/2]

    projected = projection.matmul(torch.nn.functional.rms_norm(x, (hidden,), norm_weight, 1e-5))
    projected = projected if bias is None else projected + bias
    q_k = projected[:, : (heads + kv_heads) * head_dim].reshape(tokens, heads + kv_heads, head_dim)
    expected_qk = rope_interleaved(q_k, rotation).flatten(1)  # [T, (Q+K) D]
    expected_v = projected[:, (heads + kv_heads) * head_dim :]
    halves = torch.cat([q_k[..., ::2], q_k[..., 1::2]], -1)  # the mistake: rotating halves instead of pairs
    by_halves = rope_interleaved(halves, rotation).flatten(1)

    q, kv = kernel.forward(x, torch.cos(angles), torch.sin(angles))  # [T, Q D], [T, 2 K D]
    assert q.shape == (tokens, heads * head_dim) and kv.shape == (tokens, 2 * kv_heads * head_dim)
    qk, v = torch.cat((q, kv[:, : kv_heads * head_dim]), 1), kv[:, kv_heads * head_dim :]
    scale = expected_qk.abs().max()
    # (the norm in onnxruntime and in torch may differ in the last bit, which can move an int8 rounding one step)
    assert torch.allclose(qk, expected_qk, rtol=0, atol=1e-4 * scale)
    assert torch.allclose(v, expected_v, rtol=0, atol=1e-4 * expected_v.abs().max())
    assert (by_halves - expected_qk).abs().max() > 100 * (qk - expected_qk).abs().max()
    assert kernel.forward(x.to(torch.bfloat16), torch.cos(angles), torch.sin(angles))[0].dtype == torch.bfloat16


@pytest.mark.parametrize("spec", [QuantSpec("wint4", 64), QuantSpec("wint8")], ids=str)
def test_a_moe_layer_kernel_can_start_from_the_attention_output(spec: QuantSpec) -> None:
    """`MoELayerParts.attention_output`: the kernel adds `attended @ W_o + b` to the residual stream itself,
    then runs exactly what a kernel starting from that stream does."""
    if not qmoe_supported():
        pytest.skip("this onnxruntime has no QMoE as the kernel uses it (the model then keeps one session an expert)")
    num_experts, top_k, hidden, intermediate, attended_width, tokens = 4, 2, 128, 64, 192, 5
    block = qmoe_block(spec, hidden, intermediate)
    assert block is not None
    experts = [
        (_quantized(spec, hidden, 2 * intermediate, 2 * e)[0], _quantized(spec, intermediate, hidden, 2 * e + 1)[0])
        for e in range(num_experts)
    ]
    output, _ = _quantized(spec, attended_width, hidden, seed=60)  # codes [H, Q*D], scales [G, H]
    generator = torch.Generator().manual_seed(7)
    bias = torch.randn(hidden, generator=generator) * 0.1
    parts = MoELayerParts(
        1 + 0.2 * torch.randn(hidden, generator=generator), 1e-5,
        torch.randn(num_experts, hidden, generator=generator) * 0.1, torch.zeros(num_experts), None,
    )  # fmt: skip
    from_stream = MoELayerKernel.pack(iter(experts), num_experts, spec, top_k, block, parts)
    from_attention = MoELayerKernel.pack(
        iter(experts), num_experts, spec, top_k, block,
        dataclasses.replace(parts, attention_output=output, attention_bias=bias),
    )  # fmt: skip
    projection = NBitsKernel.pack(lambda c: output[0][c], output[1], spec, attended_width)
    attended = torch.randn(tokens, attended_width, generator=generator)
    residual = torch.randn(tokens, hidden, generator=generator) * 3
    expected = from_stream.forward(residual + projection.matmul(attended) + bias)
    out = from_attention.forward_after_attention(attended, residual)
    assert torch.allclose(out, expected, rtol=0, atol=1e-4 * expected.abs().max())
    without_bias = from_stream.forward(residual + projection.matmul(attended))
    assert (without_bias - expected).abs().max() > 100 * (out - expected).abs().max()
    with pytest.raises(AssertionError):
        from_attention.forward(residual)  # it needs the attention's output, not the stream


@pytest.mark.parametrize("spec", [QuantSpec("wint4", 64), QuantSpec("wint8")], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_a_dense_layer_kernel_is_output_projection_residual_norm_and_mlp(spec: QuantSpec, with_bias: bool) -> None:
    """`MLPLayerKernel`: `h = x + a @ W_o (+ b)`, then `h + mlp(rmsnorm(h))`, as the output projection's session,
    torch's norm and a `FusedMLPKernel` compute it."""
    hidden, intermediate, attended_width, tokens = 128, 96, 192, 5
    output, _ = _quantized(spec, attended_width, hidden, seed=70)  # codes [H, Q*D], scales [G, H]
    gate_up, _ = _quantized(spec, hidden, 2 * intermediate, seed=71)
    down, _ = _quantized(spec, intermediate, hidden, seed=72)
    generator = torch.Generator().manual_seed(8)
    norm_weight = 1 + 0.2 * torch.randn(hidden, generator=generator)
    bias = torch.randn(hidden, generator=generator) * 0.1 if with_bias else None
    kernel = MLPLayerKernel.pack(output, bias, norm_weight, 1e-5, gate_up, down, spec)
    projection = NBitsKernel.pack(lambda c: output[0][c], output[1], spec, attended_width)
    mlp = FusedMLPKernel.pack(gate_up, down, spec)
    attended = torch.randn(tokens, attended_width, generator=generator)
    residual = torch.randn(tokens, hidden, generator=generator) * 3

    h = residual + projection.matmul(attended) + (0 if bias is None else bias)
    expected = h + mlp.forward(torch.nn.functional.rms_norm(h, (hidden,), norm_weight, 1e-5))
    out = kernel.forward_after_attention(attended, residual)
    # (the norm in onnxruntime and in torch may differ in the last bit, which can move an int8 rounding one step)
    assert torch.allclose(out, expected, rtol=0, atol=1e-4 * expected.abs().max())
    without_norm = h + mlp.forward(h)
    assert (without_norm - expected).abs().max() > 100 * (out - expected).abs().max()
    assert kernel.forward_after_attention(attended[:0], residual[:0]).shape == (0, hidden)
    assert kernel.forward_after_attention(attended, residual.to(torch.bfloat16)).dtype == torch.bfloat16


def _attention_input(spec: QuantSpec, hidden: int, seed: int) -> AttentionInputParts:
    heads, kv_heads, head_dim = 4, 2, 32
    qkv, _ = _quantized(spec, hidden, (heads + 2 * kv_heads) * head_dim, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    norm_weight = 1 + 0.2 * torch.randn(hidden, generator=generator)
    return AttentionInputParts(norm_weight, 1e-5, qkv, None, heads, kv_heads, head_dim)


@pytest.mark.parametrize("spec", [QuantSpec("wint4", 64), QuantSpec("wint8")], ids=str)
@pytest.mark.parametrize("layer_kind", ["dense", "moe"])
def test_a_layer_kernel_can_end_at_the_next_layers_attention_input(spec: QuantSpec, layer_kind: str) -> None:
    """`MLPLayerKernel.pack(next_attention=...)`, `MoELayerParts.next_attention`: one session gives the layer's
    output and the next layer's rotated q and k | v, as the layer's own kernel followed by that layer's
    `AttentionInputKernel` compute them; the next layer's own norm and matrix, not this one's."""
    hidden, attended_width, tokens = 128, 192, 6
    generator = torch.Generator().manual_seed(9)
    output, _ = _quantized(spec, attended_width, hidden, seed=90)  # codes [H, Q*D], scales [G, H]
    norm_weight = 1 + 0.2 * torch.randn(hidden, generator=generator)
    following, unrelated = _attention_input(spec, hidden, seed=91), _attention_input(spec, hidden, seed=92)
    if layer_kind == "dense":
        gate_up, down = _quantized(spec, hidden, 2 * 96, seed=93)[0], _quantized(spec, 96, hidden, seed=94)[0]

        def pack(next_attention: AttentionInputParts | None):
            return MLPLayerKernel.pack(output, None, norm_weight, 1e-5, gate_up, down, spec, next_attention)
    else:
        if not qmoe_supported():
            pytest.skip("this onnxruntime has no QMoE as the kernel uses it")
        num_experts, top_k, intermediate = 4, 2, 64
        block = qmoe_block(spec, hidden, intermediate)
        assert block is not None
        experts = [
            (_quantized(spec, hidden, 2 * intermediate, 2 * e)[0], _quantized(spec, intermediate, hidden, 2 * e + 1)[0])
            for e in range(num_experts)
        ]
        parts = MoELayerParts(
            norm_weight, 1e-5, torch.randn(num_experts, hidden, generator=generator) * 0.1, torch.zeros(num_experts),
            None, attention_output=output,
        )  # fmt: skip

        def pack(next_attention: AttentionInputParts | None):
            layer = dataclasses.replace(parts, next_attention=next_attention)
            return MoELayerKernel.pack(iter(experts), num_experts, spec, top_k, block, layer)

    alone, chained = pack(None), pack(following)
    assert alone.next_widths is None and chained.next_widths == (4 * 32, 2 * 2 * 32)
    attended = torch.randn(tokens, attended_width, generator=generator)
    residual = torch.randn(tokens, hidden, generator=generator) * 3
    angles = torch.tensor([0.0, 1, 2, 9, 30, 31])[:, None] * (1.0 / 10000 ** (torch.arange(16) / 16))[None, :]
    cos, sin = torch.cos(angles), torch.sin(angles)  # [T, D/2]

    y, q, kv = chained.forward_chained(attended, residual, cos, sin)
    expected_y = alone.forward_after_attention(attended, residual)
    expected_q, expected_kv = AttentionInputKernel.pack(following, spec).forward(expected_y, cos, sin)
    assert torch.allclose(y, expected_y, rtol=0, atol=1e-5 * expected_y.abs().max())
    assert torch.allclose(q, expected_q, rtol=0, atol=1e-4 * expected_q.abs().max())
    assert torch.allclose(kv, expected_kv, rtol=0, atol=1e-4 * expected_kv.abs().max())
    other_q, _ = AttentionInputKernel.pack(unrelated, spec).forward(expected_y, cos, sin)
    assert (other_q - expected_q).abs().max() > 100 * (q - expected_q).abs().max()
    assert [t.shape for t in chained.forward_chained(attended[:0], residual[:0], cos[:0], sin[:0])] == [
        (0, hidden), (0, 4 * 32), (0, 2 * 2 * 32)
    ]  # fmt: skip
    assert all(t.dtype == torch.bfloat16 for t in chained.forward_chained(attended, residual.bfloat16(), cos, sin))
    with pytest.raises(AssertionError):
        chained.forward_after_attention(attended, residual)  # its session needs the angles and gives three outputs


@pytest.mark.parametrize("spec", [QuantSpec("wint4", 128), QuantSpec("wint8")], ids=str)
def test_a_normed_head_kernel_is_the_final_norm_then_the_head(spec: QuantSpec) -> None:
    """`NormedHeadKernel`: `rmsnorm(x) @ W_head` in float32, as torch's norm and the head's own session."""
    hidden, vocab, rows = 128, 1000, 3
    head, _ = _quantized(spec, hidden, vocab, seed=80)  # codes [V, H], scales [G, V]
    generator = torch.Generator().manual_seed(9)
    norm_weight = 1 + 0.2 * torch.randn(hidden, generator=generator)
    kernel = NormedHeadKernel.pack(norm_weight, 1e-6, head, spec)
    alone = NBitsKernel.pack(lambda c: head[0][c], head[1], spec, hidden)
    x = torch.randn(rows, hidden, generator=generator) * 4
    expected = alone.matmul(torch.nn.functional.rms_norm(x, (hidden,), norm_weight, 1e-6))
    logits = kernel.forward(x)
    assert logits.shape == (rows, vocab) and logits.dtype == torch.float32
    assert torch.allclose(logits, expected, rtol=0, atol=1e-4 * expected.abs().max())
    assert (alone.matmul(x) - expected).abs().max() > 100 * (logits - expected).abs().max()
    assert kernel.forward(x.to(torch.bfloat16)).dtype == torch.float32  # logits float32 whatever comes in
    assert kernel.forward(x[:0]).shape == (0, vocab)


def test_experts_and_shared_experts_of_the_21b_fit_one_session() -> None:
    assert fits_one_session(2560, 1536, 2560) and fits_one_session(2560, 3072, 2560)  # an expert, the shared two
    assert not fits_one_session(2560, 12288, 2560)  # its dense first layer: two sessions


def test_keeps_the_callers_dtype_and_takes_strided_input() -> None:
    kernel, weight = _kernel_and_weight(QuantSpec("wint4", 64), 128, 64)
    x = torch.randn(128, 4).t()  # [4, 128], not contiguous
    assert kernel.matmul(x.to(torch.bfloat16)).dtype == torch.bfloat16
    assert torch.allclose(kernel.matmul(x), kernel.matmul(x.contiguous()))


def test_kernel_sessions_skip_the_python_run_wrapper_but_still_refuse_a_bad_feed(monkeypatch) -> None:
    import onnxruntime as ort

    kernel, _ = _kernel_and_weight(QuantSpec("wint4", 64), 128, 64)
    (session,) = kernel.sessions
    assert isinstance(session, KernelSession)
    x = torch.randn(3, 128)
    expected = session.inference_session.run(["y"], {"x": x.numpy()})[0]  # [3, 64] through the Python wrapper

    def wrapper_called(*args, **kwargs):
        raise AssertionError("InferenceSession.run was called")

    monkeypatch.setattr(ort.InferenceSession, "run", wrapper_called)
    assert torch.equal(kernel.matmul(x), torch.from_numpy(expected))
    with pytest.raises(Exception, match="Missing Input: x"):  # the C session checks the feed itself
        session.run(["y"], {})
    with pytest.raises(Exception, match="dimensions"):
        session.run(["y"], {"x": torch.randn(3, 100).numpy()})


def test_a_kernel_session_falls_back_to_run_where_onnxruntime_has_no_c_session() -> None:
    class PythonOnlySession:  # stands in for an onnxruntime whose Python session has no `_sess`
        def run(self, names, feed):
            return [feed["x"] * 2]

    session = KernelSession(PythonOnlySession())
    assert session.run(["y"], {"x": 3.0}) == [6.0]


def test_auto_sends_only_large_four_bit_matrices() -> None:
    wint4, wint8 = QuantSpec("wint4", 128), QuantSpec("wint8")
    # the 21B-A3B's quantized shapes [in, out]: every one has 2M weights or more, except the k and v projections
    for shape in [(2560, 3072), (1536, 2560), (2560, 2560), (2560, 103424), (2560, 24576), (12288, 2560)]:
        assert uses_onnxruntime("auto", wint4, *shape)
        assert not uses_onnxruntime("auto", wint8, *shape)  # torch's int8 kernel already reads at memory speed
        assert not uses_onnxruntime("torch", wint4, *shape)
    assert not uses_onnxruntime("auto", wint4, 2560, 512)
    assert not uses_onnxruntime("auto", wint4, 512, 512) and uses_onnxruntime("onnxruntime", wint4, 512, 512)
    assert uses_onnxruntime("auto", wint4, 512, 32000)  # the benchmark model's LM head


def test_without_onnxruntime_auto_is_torch_and_asking_for_it_is_an_error(monkeypatch) -> None:
    monkeypatch.setattr(torch_backend, "onnxruntime_available", lambda: False)
    assert torch_backend.cpu_quantized_kernels("auto") == "torch"
    assert torch_backend.cpu_quantized_kernels("torch") == "torch"
    with pytest.raises(BackendUnavailableError, match=r"pip install 'ernie-serve\[onnx\]'"):
        torch_backend.cpu_quantized_kernels("onnxruntime")


@pytest.mark.parametrize(("scheme", "group"), [("wint4", 64), ("wint4", -1), ("wint8", 128)], ids=str)
def test_a_model_on_onnxruntime_kernels_is_close_to_the_exact_one(
    tiny_checkpoint, first_tokens_agree, torch_threads: int, scheme: str, group: int
) -> None:
    """`--cpu-quantized-kernels onnxruntime`: every quantized matrix is an onnxruntime session (its row-wise
    codes let go), torch's own ops move to one thread, and log-probabilities stay near the exact kernels'.
    Where a block fits both widths (per channel: blocks of 32 over this model's hidden 64 and expert width 32),
    a MoE layer's norm, router, routed experts (QMoE) and shared experts are one session, else each expert is
    one session (groups of 64)."""
    checkpoint = str(tiny_checkpoint("moe_shared_tied", torch.bfloat16))
    settings = dict(quantization=scheme, quantization_group_size=group, block_size=4, max_num_batched_tokens=16)
    exact = LLM(model=checkpoint, exact_quantized_kernels=True, **settings)
    fast = LLM(model=checkpoint, cpu_quantized_kernels="onnxruntime", **settings)
    model = fast.engine.core.backend.model
    weights = [m for m in model.modules() if isinstance(m, QuantizedWeight)]
    # every MLP and expert one session, the attention projections and the head one each
    assert weights and all(isinstance(m.device_kernel, NBitsKernel | FusedPart) for w in weights for m in w.matrices)
    assert all(w.rows.numel() == 0 for w in weights)
    moes = [m for m in model.modules() if isinstance(m, SparseMoE)]
    one_session = group == -1 or scheme == "wint8"
    shared_mlps = {id(m.shared) for m in moes}
    # each attention's norm, q|k|v projection and RoPE: one session, the previous layer's where that layer's
    # feed-forward half is one session from its attention's output on (the dense first layer's always is)
    assert model.layers[0].attn.input_kernel is not None
    for previous, layer in zip(model.layers[:-1], model.layers[1:], strict=True):
        kernel = previous.mlp.layer_kernel
        chained = kernel is not None and kernel.takes_attention
        assert layer.attn.input_from_previous_layer is chained and (layer.attn.input_kernel is None) is chained
        assert kernel is None or kernel.next_widths == ((layer.attn.num_heads * layer.attn.head_dim,
            2 * layer.attn.num_kv_heads * layer.attn.head_dim) if chained else None)  # fmt: skip
    assert model.layers[-1].mlp.layer_kernel is None or model.layers[-1].mlp.layer_kernel.next_widths is None
    assert model.layers[1].attn.input_from_previous_layer  # (after the dense layer)
    assert model.rope_in_onnxruntime and not model.rope_in_torch  # (no complex factors made for torch)
    if one_session and qmoe_supported():  # the whole feed-forward half of the layer, shared experts included
        assert moes and all(m.layer_kernel is not None and m.expert_qmoe is m.expert_fused is None for m in moes)
        assert all(m.layer_kernel.takes_attention for m in moes)  # from the attention's output projection on
        assert all(m.fused is None for m in model.modules() if id(m) in shared_mlps)
    else:
        assert moes and all(m.expert_fused is not None and m.expert_qmoe is m.layer_kernel is None for m in moes)
        assert all(m.fused is not None for m in model.modules() if id(m) in shared_mlps)
    # a dense layer's feed-forward half, from the attention's output projection on, one session; the final norm
    # and the head one
    dense = [layer for layer in model.layers if isinstance(layer.mlp, MLP)]
    assert dense and all(isinstance(d.mlp.layer_kernel, MLPLayerKernel) and d.mlp.fused is None for d in dense)
    assert all(isinstance(d.attn.o_weight.matrix.device_kernel, FusedPart) for d in dense)
    assert isinstance(model.head_kernel, NormedHeadKernel)
    assert torch.get_num_threads() == (1 if torch_threads > 1 else torch_threads)
    # int8 activations per block move a tiny model's log-probabilities more than torch's bfloat16 ones do
    # (measured on these prompts: up to 0.07 nats, against 0.05), far less than a wrong weight would
    first_tokens_agree(fast, exact, 0.15)
    fast.close()
    assert torch.get_num_threads() == torch_threads  # given back


def test_auto_takes_onnxruntime_for_every_matrix_of_a_moe_model_whose_experts_run_as_qmoe() -> None:
    """`experts_run_as_qmoe`: where a MoE model's routed experts hold 2M weights or more a layer and QMoE holds
    them, `auto` resolves to onnxruntime for every matrix; dense models, tiny experts and shapes no block fits
    keep the matrix rule."""
    from ernie_serve.bench.quantization import tiny_models
    from ernie_serve.bench.workload import BENCH_MODEL
    from ernie_serve.models import PRESETS

    if not qmoe_supported():
        pytest.skip("this onnxruntime has no QMoE as the kernel uses it: auto keeps the matrix rule")
    wint8, wint4 = QuantSpec("wint8"), QuantSpec("wint4", 128)
    for spec in (wint8, wint4, QuantSpec("wint4", 64), QuantSpec("wint4")):
        assert experts_run_as_qmoe(BENCH_MODEL, spec)  # 16 experts of [512, 256]: 6.3M weights a layer
        assert experts_run_as_qmoe(PRESETS["ernie-4.5-21b-a3b"], spec)
        assert not experts_run_as_qmoe(PRESETS["ernie-4.5-0.3b"], spec)  # dense
        assert all(not experts_run_as_qmoe(config, spec) for _, config in tiny_models())
    assert not experts_run_as_qmoe(dataclasses.replace(BENCH_MODEL, moe_intermediate_size=96), wint4)  # no block
    assert not experts_run_as_qmoe(dataclasses.replace(BENCH_MODEL, moe_num_experts=4), wint8)  # 1.6M a layer


def test_a_moe_model_over_the_threshold_runs_on_onnxruntime_by_default(tmp_path, torch_threads: int) -> None:
    """The default (`auto`) on a MoE model whose experts hold 2.4M weights a layer, wint8: every quantized
    matrix an onnxruntime session, each MoE layer's feed-forward half one session around QMoE, torch on one
    thread; asking for torch's kernels still gets them."""
    from ernie_serve.bench.workload import BENCH_MODEL
    from ernie_serve.demo import write_random_checkpoint
    from ernie_serve.demo_tokenizer import build_demo_tokenizer

    if not qmoe_supported():
        pytest.skip("this onnxruntime has no QMoE as the kernel uses it: auto keeps the matrix rule")
    config = dataclasses.replace(
        BENCH_MODEL, hidden_size=128, moe_intermediate_size=384, num_hidden_layers=2, vocab_size=576
    )
    write_random_checkpoint(tmp_path, config, seed=0, dtype=torch.float32)
    build_demo_tokenizer(tmp_path)
    prompt = {"prompt_token_ids": [5, 6, 7]}
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with LLM(model=str(tmp_path), quantization="wint8", block_size=4) as llm:
        model = llm.engine.core.backend.model
        kernels = [m.device_kernel for w in model.modules() if isinstance(w, QuantizedWeight) for m in w.matrices]
        assert kernels and all(isinstance(k, NBitsKernel | FusedPart) for k in kernels)
        moes = [m for m in model.modules() if isinstance(m, SparseMoE)]
        assert moes and all(m.layer_kernel is not None for m in moes)  # experts, shared experts, norm: one session
        assert torch.get_num_threads() == 1
        fast = llm.generate(prompt, params)[0].outputs[0].token_ids
    with LLM(model=str(tmp_path), quantization="wint8", block_size=4, cpu_quantized_kernels="torch") as llm:
        model = llm.engine.core.backend.model
        kernels = [m.device_kernel for w in model.modules() if isinstance(w, QuantizedWeight) for m in w.matrices]
        assert not any(isinstance(k, NBitsKernel | FusedPart) for k in kernels)
        assert len(llm.generate(prompt, params)[0].outputs[0].token_ids) == len(fast) == 4


def test_auto_keeps_a_tiny_models_matrices_on_torch_kernels(tiny_checkpoint, torch_threads: int) -> None:
    checkpoint = str(tiny_checkpoint("moe_shared_tied", torch.bfloat16))
    llm = LLM(model=checkpoint, quantization="wint4", quantization_group_size=64)
    weights = [m for m in llm.engine.core.backend.model.modules() if isinstance(m, QuantizedWeight)]
    kernels = {type(m.device_kernel) for w in weights for m in w.matrices}  # (None: a shape torch's cannot take)
    assert Int4Kernel in kernels and NBitsKernel not in kernels and torch.get_num_threads() == torch_threads
    assert not any(m.expert_fused for m in llm.engine.core.backend.model.modules() if isinstance(m, SparseMoE))


# Run in a fresh process: onnxruntime's process-wide pool, once made, stays for the process's life.
POOLS_SCRIPT = """
import json, sys
import torch
from ernie_serve import LLM, SamplingParams
from ernie_serve.backends.torch import ort_kernels
from ernie_serve.backends.torch.model import SparseMoE

checkpoint, head_weights = sys.argv[1], int(sys.argv[2])
facts = {"threads": torch.get_num_threads()}
params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
ort_kernels.AUTO_MIN_WEIGHTS = head_weights  # `auto` then sends only the LM head to onnxruntime
with LLM(model=checkpoint, quantization="wint4", quantization_group_size=64) as llm:
    head = llm.engine.core.backend.model.head_kernel  # the final norm and the head
    facts["head_only"] = {
        "kernel": type(head).__name__,
        "own_pool": head.session.inference_session.get_session_options().use_per_session_threads,
        "torch_threads": torch.get_num_threads(),
    }
quantized = dict(quantization="wint4", quantization_group_size=64)
with LLM(model=checkpoint, cpu_quantized_kernels="onnxruntime", **quantized) as llm:
    model = llm.engine.core.backend.model
    moes = [m for m in model.modules() if isinstance(m, SparseMoE)]
    sessions = [k.session for m in moes for k in (m.expert_fused or [m.expert_qmoe or m.layer_kernel])]
    facts["everything"] = {
        "sessions": len(sessions),
        "own_pool": [s.inference_session.get_session_options().use_per_session_threads for s in sessions],
        "torch_threads": torch.get_num_threads(),
        "tokens": len(llm.generate({"prompt_token_ids": [5, 6, 7]}, params)[0].outputs[0].token_ids),
    }
facts["torch_threads_after"] = torch.get_num_threads()
with LLM(model=checkpoint, backend="onnx") as llm:  # its session must take the process-wide pool now
    facts["onnx_tokens"] = len(llm.generate({"prompt_token_ids": [5, 6, 7]}, params)[0].outputs[0].token_ids)
print(json.dumps(facts))
"""


def test_thread_pools_follow_who_holds_the_weights(tiny_checkpoint) -> None:
    """Where onnxruntime holds only the LM head, its session has a pool of its own (spin-waiting off) and torch
    keeps its threads; where it holds every quantized weight, its sessions share the process-wide pool and torch
    runs on one thread until `close()`; after that the onnx backend's session runs on that pool too."""
    checkpoint = tiny_checkpoint("moe_shared_tied", torch.bfloat16)
    config = json.loads((checkpoint / "config.json").read_text())
    head_weights = config["hidden_size"] * config["vocab_size"]
    run = subprocess.run(
        [sys.executable, "-c", POOLS_SCRIPT, str(checkpoint), str(head_weights)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    facts = json.loads(run.stdout.strip().splitlines()[-1])
    threads = facts["threads"]
    assert facts["head_only"] == {"kernel": "NormedHeadKernel", "own_pool": True, "torch_threads": threads}
    everything = facts["everything"]
    assert everything["sessions"] > 0 and not any(everything["own_pool"])
    assert everything["torch_threads"] == 1 and everything["tokens"] == 4
    assert facts["torch_threads_after"] == threads and facts["onnx_tokens"] == 4
