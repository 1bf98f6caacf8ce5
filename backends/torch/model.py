"""ERNIE 4.5 (dense `Ernie4_5ForCausalLM` and MoE `Ernie4_5_MoeForCausalLM`) in plain PyTorch, over a paged KV
cache. Single-device: parallelism is applied elsewhere, after construction.

Legend: T tokens in the step (all requests, flattened), S tokens that sample, H hidden size, Q query heads,
K key/value heads, D head dim, E routed experts, k experts per token, I expert (or dense) intermediate size,
V vocab, N slots in the KV pool (blocks x block size), B requests in a batched attention group, L context length.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ernie_serve.backends.torch.malloc import trim_heap
from ernie_serve.backends.torch.ort_kernels import (
    PIECE_WEIGHTS,
    AttentionInputKernel,
    AttentionInputParts,
    FusedMLPKernel,
    FusedPart,
    MLPLayerKernel,
    MoELayerKernel,
    MoELayerParts,
    NormedHeadKernel,
    RoutedExpertsKernel,
    fits_one_session,
    share_thread_pool,
    uses_onnxruntime,
)
from ernie_serve.backends.torch.quant import (
    QuantizedWeight,
    QuantMatrix,
    QuantTarget,
    onnxruntime_share,
    stacked_row_sums,
)
from ernie_serve.core.config import ModelConfig
from ernie_serve.logging import progress
from ernie_serve.ort_contrib import qmoe_supported
from ernie_serve.quantization import QuantSpec, qmoe_block

# A projection weight: full precision `[in, out]`, or quantized (`--quantization`, see backends/torch/quant.py).
Weight = torch.Tensor | QuantizedWeight | QuantMatrix
# The hooks below are None on a single device; backends/torch/parallel.py sets them on one rank's shard.
Hook = Callable[[torch.Tensor], torch.Tensor]


class RowParallelOutput:
    """Hooks of a block whose output projection may be one rank's share of a row-parallel product."""

    reduce: Hook | None = None  # sums the ranks' partial outputs `[T, H]`
    adds_residual: bool = True  # False on every rank but one, so the residual (and output bias) count once

    def _finish(self, out: torch.Tensor) -> torch.Tensor:  # [T, H]
        return out if self.reduce is None else self.reduce(out)


@dataclass
class PrefillGroup:
    """One request computing more than one token this step."""

    token_start: int  # its first row in the step's flattened tokens
    num_tokens: int  # rows it computes
    context_blocks: torch.Tensor | None = None  # [nb] KV blocks of its context; None: no cached prefix
    context_len: int = 0  # tokens of context, cached prefix included
    mask: torch.Tensor | None = None  # [n, L] query i sees context positions <= start + i


@dataclass
class DecodeGroup:
    """Single-token requests whose attention runs as one batch (`TorchBackend._decode_groups` groups them by
    context length, so little of a group's batch is padding)."""

    rows: torch.Tensor  # [B] their rows in the step, in order
    blocks: torch.Tensor  # [B, nb] their block tables, padded with each request's own first block
    mask: torch.Tensor | None = None  # [B, 1, 1, nb * block_size] added to the scores: 0 where the slot is real
    # context, -inf elsewhere; None for a lone request, which reads exactly `context_len` slots
    context_len: int = 0
    # a lone request whose blocks are consecutive in the pool: its context is the slots from this one on, read in
    # place (no copy of its blocks: measured on the CPU benchmark model, 2 x 37 us a layer of a 10-block context,
    # when keys and values were gathered one at a time)
    first_slot: int | None = None


@dataclass
class AttentionMetadata:
    """Where each token's KV goes and what each query attends to; built once per step, shared by all layers."""

    slot_mapping: torch.Tensor  # [T] KV pool slot each new token writes
    block_size: int
    fresh_blocks: torch.Tensor | None = None  # [F] blocks written from their first slot this step: zeroed first
    decode_groups: list[DecodeGroup] = field(default_factory=list)  # the single-token requests
    prefills: list[PrefillGroup] = field(default_factory=list)


def gather_blocks(cache: torch.Tensor, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Copy whole KV blocks out of a layer's pool `[N, 2, K, D]` -> `[*blocks.shape[:-1], nb * block_size, 2, K,
    D]`. `index_select` over block rows copies contiguous memory; per-slot advanced indexing is many times slower."""
    per_block = cache.view(-1, block_size * cache.stride(0))  # [N / block_size, bs*2*K*D]
    rows = per_block.index_select(0, blocks.flatten())
    return rows.view(*blocks.shape[:-1], blocks.shape[-1] * block_size, *cache.shape[1:])


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel; the same math when nothing needs casting
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _param(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def _weight(
    *shape: int, dtype: torch.dtype, device: torch.device, quant: QuantSpec | None
) -> nn.Parameter | QuantizedWeight:
    """A projection weight `[count?, in, out]`: a float parameter, or quantized storage from the start (the
    full-precision weight of a quantized layer is never allocated)."""
    if quant is None:
        return _param(*shape, dtype=dtype, device=device)
    *count, in_features, out_features = shape
    return QuantizedWeight(count[0] if count else 1, in_features, out_features, quant, device)


def _matrix(weight: Weight) -> QuantMatrix | torch.Tensor:
    """The one matrix a projection weight holds: a quantized weight's `QuantMatrix`, else the weight itself."""
    return weight.matrix if isinstance(weight, QuantizedWeight) else weight


def _target(weight: nn.Parameter | QuantizedWeight, index: int | None, columns: slice) -> torch.Tensor | QuantTarget:
    """What the checkpoint tensor of `columns` of `weight` (matrix `index` of a stack) fills: a transposed view
    of a float weight in the checkpoint's `[out, in]` shape, or a quantizing target."""
    if isinstance(weight, QuantizedWeight):
        return weight.target(index or 0, columns)
    matrix = weight if index is None else weight[index]
    return matrix[:, columns].t()


def sums_weight_rows(x: torch.Tensor, max_rows: int = 1) -> bool:
    """Whether `x` (at most `max_rows` rows) is multiplied as weighted sums of weight rows (`embedding_bag`)
    instead of a matmul. On CPU in float32, products with a row or a few are bound by how fast the weights
    stream from memory, and fbgemm's `embedding_bag` kernels stream `[in, out]` weights up to ~2x faster than
    MKL's GEMV on these CPUs. `embedding_bag` runs its bags in parallel, so a single sum is split into one bag
    per torch thread (`split_bags`)."""
    return 0 < x.shape[0] <= max_rows and x.device.type == "cpu" and x.dtype == torch.float32


@functools.cache
def _split_bags(rows: int, parts: int) -> torch.Tensor:
    return torch.arange(min(parts, rows)) * -(-rows // min(parts, rows))


def split_bags(rows: int) -> torch.Tensor:
    """Starts of the bags that split `rows` summed rows evenly over the torch threads."""
    return _split_bags(rows, max(1, torch.get_num_threads()))


@functools.cache
def _row_numbers(rows: int) -> torch.Tensor:
    return torch.arange(rows)


@functools.cache
def _onednn_linear_available() -> bool:
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_linear_pointwise")
        and hasattr(ops, "_reorder_linear_weight")
    )


def packed_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def onednn_pack(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked copy of a float32 CPU weight given as `[out, in]` (any strides), for `project`; None
    where that does not apply. Several rows at once, oneDNN's GEMM runs 1.5-3x faster than MKL's on these
    (AMD) CPUs: MKL's skinny-matrix path is slow here (LM head at 48 rows: 16 ms against 37 ms)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not _onednn_linear_available():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def project(
    x: torch.Tensor,  # [T, in]
    weight: Weight,  # [in, out]
    bias: torch.Tensor | None = None,  # [out]
    residual: torch.Tensor | None = None,  # [T, out]
    packed: torch.Tensor | None = None,  # the same weight from `onednn_pack`, if prepared
) -> torch.Tensor:
    """`x @ weight (+ bias) (+ residual)`, by the fastest kernel for the shape: a single row on CPU as weight row
    sums (`sums_weight_rows`), several rows by oneDNN when the weight was packed, otherwise one (add)mm.
    Projection weights are stored `[in, out]`, the layout the row sums need; quantized ones take the same
    decision with their own kernels (`QuantMatrix.row_sums` / `.matmul`)."""
    if not isinstance(weight, torch.Tensor):
        matrix = _matrix(weight)
        # fbgemm's int8 GEMM and torch's int8/int4 kernels also win at one row
        if sums_weight_rows(x) and matrix.packed is None and matrix.device_kernel is None:
            out = matrix.row_sums(x, split_bags(matrix.in_features))  # [1, out]
        else:
            out = matrix.matmul(x)  # [T, out]
        out = out if bias is None else out + bias
        return out if residual is None else out + residual
    if sums_weight_rows(x):
        rows = weight.shape[0]
        parts = F.embedding_bag(_row_numbers(rows), weight, split_bags(rows), mode="sum", per_sample_weights=x[0])
        out = parts.sum(0, keepdim=True)  # [1, out] from [threads, out]
        out = out if bias is None else out + bias
        return out if residual is None else out + residual
    if packed is not None:
        if residual is None:
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed, bias, "add")
    base = residual if bias is None else (bias if residual is None else residual + bias)
    return torch.mm(x, weight) if base is None else torch.addmm(base, x, weight)  # [T, out]


def _mlp_for_onnxruntime(gate_up: Weight, down: Weight, policy: str) -> tuple[QuantMatrix, QuantMatrix] | None:
    """A quantized SwiGLU MLP's two CPU matrices where `--cpu-quantized-kernels` (`policy`) sends both to
    onnxruntime, neither is packed yet, and they fit one session; else None."""
    if isinstance(gate_up, QuantizedWeight) and isinstance(down, QuantizedWeight):
        gate_up, down = gate_up.matrix, down.matrix
    if not (isinstance(gate_up, QuantMatrix) and isinstance(down, QuantMatrix)) or gate_up.rows.device.type != "cpu":
        return None
    if gate_up.device_kernel is not None or down.device_kernel is not None:
        return None  # already packed
    spec, hidden, out = gate_up.spec, gate_up.in_features, down.out_features
    intermediate = down.in_features
    if not (
        uses_onnxruntime(policy, spec, hidden, 2 * intermediate)
        and uses_onnxruntime(policy, spec, intermediate, out)
        and fits_one_session(hidden, intermediate, out)
    ):
        return None
    return gate_up, down


def fuse_for_onnxruntime(gate_up: Weight, down: Weight, policy: str) -> FusedMLPKernel | None:
    """One onnxruntime session for a quantized SwiGLU MLP's two CPU matrices (`FusedMLPKernel`) where
    `--cpu-quantized-kernels` (`policy`) sends both to onnxruntime and they fit one session."""
    matrices = _mlp_for_onnxruntime(gate_up, down, policy)
    return None if matrices is None else _fused_mlp(*matrices)


def _fused_mlp(gate_up: QuantMatrix, down: QuantMatrix) -> FusedMLPKernel:
    """The `FusedMLPKernel` of two matrices `_mlp_for_onnxruntime` accepted; each keeps a `FusedPart` as its
    kernel, so its stack lets go of the row-wise codes when packed (`pack_for_device`)."""
    kernel = FusedMLPKernel.pack((gate_up.codes().t(), gate_up.scales), (down.codes().t(), down.scales), gate_up.spec)
    gate_up_weights = gate_up.in_features * gate_up.out_features
    share = kernel.nbytes() * gate_up_weights // (gate_up_weights + down.in_features * down.out_features)  # by weights
    gate_up.device_kernel, down.device_kernel = FusedPart(share), FusedPart(kernel.nbytes() - share)
    return kernel


def _experts(weight: nn.Parameter | QuantizedWeight) -> list[Weight]:
    """Each expert's `[in, out]` weight of a stack."""
    return list(weight.matrices) if isinstance(weight, QuantizedWeight) else list(weight.unbind(0))


@dataclass
class RopeFactors:
    """One step's RoPE factors, made once per forward for every layer."""

    rotation: torch.Tensor | None = None  # [T, 1, D/2] complex64 cos + i sin, where a layer rotates in torch
    cos: torch.Tensor | None = None  # [T, D/2] float32, where a layer rotates in onnxruntime (AttentionInputKernel)
    sin: torch.Tensor | None = None


def rope_interleaved(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """ERNIE's RoPE rotates adjacent pairs (2i, 2i+1), GPT-J style: as complex numbers `x[2i] + i x[2i+1]`
    that is one multiplication by `cos + i sin`, computed in float32. x `[T, heads, D]`, rotation
    `[T, 1, D/2]` complex64."""
    pairs = torch.view_as_complex(x.float().view(*x.shape[:-1], -1, 2).contiguous())  # [T, heads, D/2]
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)


class Attention(RowParallelOutput, nn.Module):
    def __init__(
        self, config: ModelConfig, dtype: torch.dtype, device: torch.device, quant: QuantSpec | None = None
    ) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_weight = _weight(config.hidden_size, q + 2 * kv, dtype=dtype, device=device, quant=quant)  # [H, q|k|v]
        self.o_weight = _weight(q, config.hidden_size, dtype=dtype, device=device, quant=quant)  # [Q*D, H]
        self.qkv_bias = _param(q + 2 * kv, dtype=dtype, device=device) if config.use_bias else None
        self.o_bias = _param(config.hidden_size, dtype=dtype, device=device) if config.use_bias else None
        self.scale = self.head_dim**-0.5
        self.qkv_packed: torch.Tensor | None = None  # see `pack_weights`
        self.o_packed: torch.Tensor | None = None
        self.input_kernel: AttentionInputKernel | None = None  # see `fuse_for_onnxruntime`
        # whether the previous layer's session computes this one's input half instead (`input_parts`)
        self.input_from_previous_layer = False

    def pack_weights(self) -> int:
        """Called once after loading: oneDNN copies of the projections where they apply (`onednn_pack`), or
        fbgemm copies of quantized ones (`pack_for_gemm`). Returns the bytes they take."""
        if isinstance(self.qkv_weight, QuantizedWeight):
            return self.qkv_weight.pack_for_gemm() + self.o_weight.pack_for_gemm()
        self.qkv_packed, self.o_packed = onednn_pack(self.qkv_weight.t()), onednn_pack(self.o_weight.t())
        return packed_bytes(self.qkv_packed, self.o_packed)

    def fuse_for_onnxruntime(self, policy: str, norm: RMSNorm) -> None:
        """Called after loading, before its quantized weights are packed: where the q|k|v matrix goes to
        onnxruntime (`--cpu-quantized-kernels`) in one session, `norm` (the layer's input norm), it and RoPE become
        one session (`AttentionInputKernel`), which `forward` then starts from (unless the previous layer's
        session took them: `input_parts`)."""
        parts = self.input_parts(policy, norm)
        if parts is None:
            return
        matrix = _matrix(self.qkv_weight)
        self.input_kernel = AttentionInputKernel.pack(parts, matrix.spec)
        matrix.device_kernel = FusedPart(self.input_kernel.nbytes())

    def input_parts(self, policy: str, norm: RMSNorm) -> AttentionInputParts | None:
        """What its input half's session is made of (with `norm`, the layer's input norm), where the q|k|v matrix
        goes to onnxruntime in one session and no session holds it yet; the previous layer's feed-forward
        session takes these where it can (`DecoderLayer.fuse_for_onnxruntime`), else this block's own
        `AttentionInputKernel`."""
        matrix = _matrix(self.qkv_weight)
        if self.input_kernel is not None or not isinstance(matrix, QuantMatrix) or matrix.rows.device.type != "cpu":
            return None
        hidden, width = matrix.in_features, matrix.out_features
        if matrix.device_kernel is not None or hidden * width > PIECE_WEIGHTS:
            return None
        if not uses_onnxruntime(policy, matrix.spec, hidden, width):
            return None
        return AttentionInputParts(
            norm.weight, norm.eps, (matrix.codes().t(), matrix.scales), self.qkv_bias,
            self.num_heads, self.num_kv_heads, self.head_dim,
        )  # fmt: skip

    def output_codes(self, policy: str) -> QuantMatrix | None:
        """The output projection's matrix where the layer's `MoELayerKernel` can start from this block's output
        (`MoELayerParts.attention_output`): on one device (no reduction between), bound for onnxruntime."""
        matrix = _matrix(self.o_weight)
        if self.reduce is not None or not self.adds_residual or not isinstance(matrix, QuantMatrix):
            return None
        hidden, attended = matrix.out_features, matrix.in_features
        if matrix.device_kernel is not None or hidden * attended > PIECE_WEIGHTS:
            return None
        return matrix if uses_onnxruntime(policy, matrix.spec, attended, hidden) else None

    def forward(
        self,
        x: torch.Tensor,  # [T, H] the residual stream
        rope: RopeFactors,
        kv_cache: torch.Tensor,  # [N, 2, K, D] each slot's key and value side by side
        meta: AttentionMetadata,
        norm: RMSNorm,  # the layer's input norm
        # rotated q [T, Q*D] and rotated k | v [T, 2*K*D], where the previous layer's session computed them
        computed: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:  # [T, Q*D] the heads' outputs, before the output projection (`output`)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if meta.fresh_blocks is not None:
            # Attention reads whole blocks; the unwritten tail of a block must hold finite values (masked
            # scores are zero weights, and 0 * NaN from uninitialized memory would still poison the output).
            kv_cache.view(-1, meta.block_size * kv_cache.stride(0)).index_fill_(0, meta.fresh_blocks, 0)
        if computed is not None or self.input_kernel is not None:
            if computed is None:
                assert self.input_kernel is not None and rope.cos is not None and rope.sin is not None
                computed = self.input_kernel.forward(x, rope.cos, rope.sin)
            q, kv = computed  # [T, Q*D] rotated, [T, 2*K*D] rotated k | v
            q = q.view(-1, self.num_heads, self.head_dim)  # [T, Q, D]
            kv = kv.view(-1, 2, self.num_kv_heads, self.head_dim)  # [T, 2, K, D]
            kv_cache.index_copy_(0, meta.slot_mapping, kv)  # (one copy: the kernel put them side by side)
            k = v = None  # (a prefill's own keys and values are `kv`'s halves: taken only where one needs them)
        else:
            assert rope.rotation is not None
            qkv = project(norm(x), self.qkv_weight, self.qkv_bias, packed=self.qkv_packed)  # [T, (Q+2K)*D]
            # q and k sit side by side in the fused output: rotate both with one multiplication
            qk = qkv[:, : q_size + kv_size].view(-1, self.num_heads + self.num_kv_heads, self.head_dim)  # [T, Q+K, D]
            qk = rope_interleaved(qk, rope.rotation)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]  # [T, Q, D], [T, K, D]
            v = qkv[:, q_size + kv_size :].view(-1, self.num_kv_heads, self.head_dim)  # [T, K, D]
            kv_cache[:, 0].index_copy_(0, meta.slot_mapping, k)
            kv_cache[:, 1].index_copy_(0, meta.slot_mapping, v)

        if len(meta.decode_groups) == 1 and not meta.prefills:  # every row is one decode, in order
            return self._decode(q, meta.decode_groups[0], kv_cache, meta.block_size).flatten(1)  # [T, Q*D]
        out = torch.empty_like(q)  # [T, Q, D]
        for decodes in meta.decode_groups:
            out.index_copy_(
                0, decodes.rows, self._decode(q.index_select(0, decodes.rows), decodes, kv_cache, meta.block_size)
            )
        for group in meta.prefills:
            rows = slice(group.token_start, group.token_start + group.num_tokens)
            qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, Q, n, D]
            if group.context_blocks is None:  # whole prompt in this step: causal over the new tokens only
                if k is None or v is None:
                    k, v = kv[:, 0], kv[:, 1]  # [T, K, D] each
                kp = k[rows].transpose(0, 1).unsqueeze(0)  # [1, K, n, D]
                vp = v[rows].transpose(0, 1).unsqueeze(0)
                op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=self.scale, enable_gqa=True)
            else:  # continues a cached prefix
                context = gather_blocks(kv_cache, group.context_blocks, meta.block_size)[: group.context_len]
                op = F.scaled_dot_product_attention(
                    qp,
                    context[:, 0].transpose(0, 1).unsqueeze(0),  # [1, K, L, D]
                    context[:, 1].transpose(0, 1).unsqueeze(0),
                    attn_mask=group.mask,
                    scale=self.scale,
                    enable_gqa=True,
                )
            out[rows] = op.squeeze(0).transpose(0, 1)
        return out.flatten(1)

    def _decode(
        self,
        q: torch.Tensor,  # [B, Q, D] one query row per request
        group: DecodeGroup,
        kv_cache: torch.Tensor,  # [N, 2, K, D], this step's keys and values written
        block_size: int,
    ) -> torch.Tensor:  # [B, Q, D]
        batch = q.shape[0]
        # Query heads sharing a KV head become that head's "query positions" (all at the same place), so
        # attention needs no copy of K/V per query head.
        qd = q.reshape(batch, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)  # [B, K, G, D]
        if group.first_slot is not None:  # one request, its context in place
            context = kv_cache[group.first_slot : group.first_slot + group.context_len].unsqueeze(0)  # [1, L, 2, K, D]
        else:
            context = gather_blocks(kv_cache, group.blocks, block_size)  # [B, L, 2, K, D]
            if group.mask is None:  # one request: its exact context
                context = context[:, : group.context_len]
        kd, vd = context[:, :, 0].transpose(1, 2), context[:, :, 1].transpose(1, 2)  # [B, K, L, D] strided views
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=group.mask, scale=self.scale)  # [B, K, G, D]
        return od.reshape(batch, self.num_heads, self.head_dim)

    def output(self, attended: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:  # [T, Q*D] -> residual + [T, H]
        """The output projection, added to the residual stream (`residual`, the layer's input)."""
        added = residual if self.adds_residual else None
        return self._finish(project(attended, self.o_weight, self.o_bias, added, self.o_packed))


class MLP(RowParallelOutput, nn.Module):
    """SwiGLU `down(silu(gate(x)) * up(x))` with gate and up fused into one matmul."""

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
        quant: QuantSpec | None = None,
    ) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_weight = _weight(hidden, 2 * intermediate, dtype=dtype, device=device, quant=quant)  # [H, gate|up]
        self.down_weight = _weight(intermediate, hidden, dtype=dtype, device=device, quant=quant)  # [I, H]
        self.gate_up_bias = _param(2 * intermediate, dtype=dtype, device=device) if bias else None
        self.down_bias = _param(hidden, dtype=dtype, device=device) if bias else None
        self.gate_up_packed: torch.Tensor | None = None  # see `pack_weights`
        self.down_packed: torch.Tensor | None = None
        self.fused: FusedMLPKernel | None = None  # see `fuse_for_onnxruntime`
        self.layer_kernel: MLPLayerKernel | None = None  # the layer's feed-forward half, its attention's output on

    def pack_weights(self) -> int:
        """Called once after loading: oneDNN copies of the projections where they apply (`onednn_pack`), or
        fbgemm copies of quantized ones (`pack_for_gemm`). Returns the bytes they take."""
        if isinstance(self.gate_up_weight, QuantizedWeight):
            return self.gate_up_weight.pack_for_gemm() + self.down_weight.pack_for_gemm()
        self.gate_up_packed = onednn_pack(self.gate_up_weight.t())
        self.down_packed = onednn_pack(self.down_weight.t())
        return packed_bytes(self.gate_up_packed, self.down_packed)

    def fuse_for_onnxruntime(
        self,
        policy: str,
        norm: RMSNorm | None = None,
        attention: Attention | None = None,
        next_attention: AttentionInputParts | None = None,
    ) -> None:
        """Called after loading, before its quantized weights are packed: the MLP as one session
        (`fuse_for_onnxruntime`), or, given its layer's post-attention `norm` and `attention` whose output
        projection can join (`Attention.output_codes`: one device, onnxruntime's), the layer's whole
        feed-forward half from the attention's output on (`MLPLayerKernel`, which `DecoderLayer` then runs),
        with the next layer's attention input half too where `next_attention` is given."""
        if self.fused is not None or self.layer_kernel is not None:
            return
        if self.gate_up_bias is not None or self.down_bias is not None:
            return
        matrices = _mlp_for_onnxruntime(self.gate_up_weight, self.down_weight, policy)
        if matrices is None:
            return
        output = None
        if norm is not None and attention is not None and self.reduce is None and self.adds_residual:
            output = attention.output_codes(policy)
        if output is None:
            self.fused = _fused_mlp(*matrices)
            return
        assert norm is not None and attention is not None
        gate_up, down = matrices
        kernel = self.layer_kernel = MLPLayerKernel.pack(
            (output.codes().t(), output.scales), attention.o_bias, norm.weight, norm.eps,
            (gate_up.codes().t(), gate_up.scales), (down.codes().t(), down.scales), gate_up.spec, next_attention,
        )  # fmt: skip
        for matrix in (output, gate_up, down):
            matrix.device_kernel = FusedPart(kernel.nbytes() // 3)  # (with the next layer's q|k|v where it holds it)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:  # [T, H] -> [T, H]
        added = residual if self.adds_residual else None
        if self.fused is not None:
            out = self.fused.forward(x)  # [T, H]
            return self._finish(out if added is None else out + added)
        gate_up = project(x, self.gate_up_weight, self.gate_up_bias, packed=self.gate_up_packed)  # [T, 2I]
        hidden = F.silu(gate_up[:, : self.intermediate]) * gate_up[:, self.intermediate :]  # [T, I]
        return self._finish(project(hidden, self.down_weight, self.down_bias, added, self.down_packed))


# Up to this many (token, expert) assignments in a step, the MoE runs as weighted sums of weight rows
# (`SparseMoE._forward_few_tokens`); above it, one GEMM per expert is faster. Measured on these CPUs with the
# benchmark model (16 experts, top-4): the row sums were faster up to 16 tokens, the GEMMs from 27.
FEW_TOKEN_ASSIGNMENTS = 64


@functools.cache
def _expert_bag_starts(tokens: int, top_k: int, hidden: int) -> torch.Tensor:
    """gate|up bags of `_forward_few_tokens`: `hidden` rows per (token, expert)."""
    return torch.arange(tokens * top_k) * hidden


@functools.cache
def _token_bag_starts(tokens: int, rows_per_token: int) -> torch.Tensor:
    return torch.arange(tokens) * rows_per_token


class SparseMoE(RowParallelOutput, nn.Module):
    """Top-k routed experts plus optional always-on shared experts.

    Routing is float32 with the correction bias used only to choose experts. Tokens are sorted by expert
    and each active expert runs one matmul over all its tokens: the Python loop is over experts, never tokens.
    A few tokens on CPU (decode of a few requests) take `_forward_few_tokens` instead.
    """

    def __init__(
        self, config: ModelConfig, dtype: torch.dtype, device: torch.device, quant: QuantSpec | None = None
    ) -> None:
        super().__init__()
        e, h, i = config.moe_num_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts, self.top_k, self.intermediate = e, config.moe_k, i
        self.norm_min = config.moe_norm_min
        self.router_weight = _param(e, h, dtype=torch.float32, device=device)  # [E, H], always float32
        self.score_bias = _param(e, dtype=torch.float32, device=device)  # [E] selection-only correction
        # the router and its correction bias stay float32 under --quantization: they choose the experts
        self.gate_up_weight = _weight(e, h, 2 * i, dtype=dtype, device=device, quant=quant)  # [E, H, gate|up]
        self.down_weight = _weight(e, i, h, dtype=dtype, device=device, quant=quant)  # [E, I, H]
        # per-expert views, taken once, so the hot loop indexes a Python list instead of slicing a tensor
        self.quantized = isinstance(self.gate_up_weight, QuantizedWeight)
        self.expert_weights: list[tuple[Weight, Weight]] = list(
            zip(_experts(self.gate_up_weight), _experts(self.down_weight), strict=True)
        )
        # Row numbers of each expert's weights seen as one `[E*H, 2I]` / `[E*I, H]` table (few-token path).
        self.register_buffer("expert_input_rows", torch.arange(e * h, device=device).view(e, h), persistent=False)
        self.register_buffer("expert_hidden_rows", torch.arange(e * i, device=device).view(e, i), persistent=False)
        shared = config.moe_num_shared_experts * i
        self.shared = MLP(h, shared, config.use_bias, dtype, device, quant) if shared else None
        self.expert_packed: list[tuple[torch.Tensor | None, torch.Tensor | None]] | None = None
        self.expert_fused: list[FusedMLPKernel] | None = None  # see `fuse_for_onnxruntime`
        self.expert_qmoe: RoutedExpertsKernel | None = None  # all routed experts in one session, idem
        # the norm before it and all of it in one session (from the attention's output on, its output projection
        # and the residual included, where `layer_kernel.takes_attention`), idem
        self.layer_kernel: MoELayerKernel | None = None
        # expert parallelism (parallel.py): computes `residual + this rank's experts' share` instead of the paths
        # below, which assume every expert is local; takes (x, experts, weights, residual)
        self.routed_hook: Callable[..., torch.Tensor] | None = None

    def pack_weights(self) -> int:
        """Called once after loading: oneDNN copies of every expert's projections for the grouped path (the
        few-token path reads the stacked weights), or fbgemm copies of quantized ones. Returns the bytes they
        take."""
        if isinstance(self.gate_up_weight, QuantizedWeight) and isinstance(self.down_weight, QuantizedWeight):
            return self.gate_up_weight.pack_for_gemm() + self.down_weight.pack_for_gemm()
        self.expert_packed = [(onednn_pack(g.t()), onednn_pack(d.t())) for g, d in self.expert_weights]
        return sum(packed_bytes(*pair) for pair in self.expert_packed)

    def fuse_for_onnxruntime(
        self,
        policy: str,
        norm: RMSNorm | None = None,
        attention: Attention | None = None,
        next_attention: AttentionInputParts | None = None,
    ) -> None:
        """Called after loading, before its quantized weights are packed: where every expert's two matrices go
        to onnxruntime (`--cpu-quantized-kernels`), all routed experts as one `QMoE` session where this
        onnxruntime has it and one block fits both widths: with `norm` (the layer's post-attention norm) and
        shared experts that can join it, the layer's whole feed-forward half (`MoELayerKernel`, which
        `forward_layer` runs; from `attention`'s output on, its output projection included, where that can join
        too: `Attention.output_codes`, and then with `next_attention`, the next layer's attention input half,
        where given), else the routed experts alone (`RoutedExpertsKernel`); otherwise each
        expert as one session (`fuse_for_onnxruntime`); all or none. Expert parallelism (`routed_hook`, set
        before this is called) runs its experts one by one, so it keeps the last."""
        if self.expert_fused is not None or self.expert_qmoe is not None or self.layer_kernel is not None:
            return
        if self.routed_hook is None and self._fuse_into_qmoe(policy, norm, attention, next_attention):
            return
        first = fuse_for_onnxruntime(*self.expert_weights[0], policy)
        if first is None:
            return  # every expert has the first's shapes: none would be fused
        rest = [fuse_for_onnxruntime(gate_up, down, policy) for gate_up, down in self.expert_weights[1:]]
        assert all(kernel is not None for kernel in rest)
        self.expert_fused = [first, *rest]  # type: ignore[list-item]

    def _fuse_into_qmoe(
        self,
        policy: str,
        norm: RMSNorm | None,
        attention: Attention | None,
        next_attention: AttentionInputParts | None,
    ) -> bool:
        """`fuse_for_onnxruntime`'s QMoE cases; True where it made a kernel. Each matrix it took keeps a
        `FusedPart` (its share of the bytes), so its stack lets go of the row-wise codes when packed."""
        matrices = [matrix for pair in self.expert_weights for matrix in pair]
        if not all(isinstance(m, QuantMatrix) and m.rows.device.type == "cpu" for m in matrices):
            return False
        gate_up, down = self.expert_weights[0]
        assert isinstance(gate_up, QuantMatrix) and isinstance(down, QuantMatrix)
        spec, hidden, intermediate = gate_up.spec, gate_up.in_features, down.in_features  # (this rank's share)
        block = qmoe_block(spec, hidden, intermediate)
        if not (
            block is not None
            and uses_onnxruntime(policy, spec, hidden, gate_up.out_features)
            and uses_onnxruntime(policy, spec, intermediate, down.out_features)
            and all(m.device_kernel is None for m in matrices)  # type: ignore[union-attr]
            and qmoe_supported()
        ):
            return False
        experts = (  # one expert's codes at a time
            ((g.codes().t(), g.scales), (d.codes().t(), d.scales))  # type: ignore[union-attr]
            for g, d in self.expert_weights
        )
        shared = self._shared_for_layer_kernel(policy) if norm is not None else None
        kernel: MoELayerKernel | RoutedExpertsKernel
        if shared is not None:
            assert norm is not None
            gate_up_down = None
            if shared:  # (gate|up codes [2S, H], scales), (down codes [H, S], scales)
                gate_up_down = tuple((m.codes().t(), m.scales) for m in shared)
            parts = MoELayerParts(
                norm.weight, norm.eps, self.router_weight, self.score_bias, gate_up_down, self.adds_residual
            )
            output = attention.output_codes(policy) if attention is not None else None  # None under TP
            if output is not None:
                assert attention is not None  # (the layer's kernel then starts from its output)
                parts.attention_output, parts.attention_bias = (output.codes().t(), output.scales), attention.o_bias
                parts.next_attention = next_attention
                shared = [*shared, output]
            kernel = self.layer_kernel = MoELayerKernel.pack(experts, self.num_experts, spec, self.top_k, block, parts)
            matrices += shared
        else:
            kernel = self.expert_qmoe = RoutedExpertsKernel.pack(experts, self.num_experts, spec, self.top_k, block)
        share = kernel.nbytes() // len(matrices)
        for matrix in matrices:
            matrix.device_kernel = FusedPart(share)  # type: ignore[union-attr]
        return True

    def _shared_for_layer_kernel(self, policy: str) -> list[QuantMatrix] | None:
        """The shared experts' two matrices where they can join a `MoELayerKernel` ([] without shared experts),
        None where they cannot (a bias, or a matrix onnxruntime would not take)."""
        if self.shared is None:
            return []
        mlp = self.shared
        gate_up, down = _matrix(mlp.gate_up_weight), _matrix(mlp.down_weight)
        if not (isinstance(gate_up, QuantMatrix) and isinstance(down, QuantMatrix)):
            return None
        if mlp.gate_up_bias is not None or mlp.down_bias is not None or gate_up.device_kernel or down.device_kernel:
            return None
        hidden, width = gate_up.in_features, down.in_features
        eligible = uses_onnxruntime(policy, gate_up.spec, hidden, 2 * width) and uses_onnxruntime(
            policy, down.spec, width, down.out_features
        )
        return [gate_up, down] if eligible and fits_one_session(hidden, width, down.out_features) else None

    def run_expert(self, expert: int, rows: torch.Tensor) -> torch.Tensor:  # [n, H] -> [n, H]
        """One expert's SwiGLU over the rows routed to it (unweighted)."""
        if self.expert_fused is not None:
            return self.expert_fused[expert].forward(rows)
        gate_up_weight, down_weight = self.expert_weights[expert]
        gate_up_packed, down_packed = self.expert_packed[expert] if self.expert_packed else (None, None)
        gate_up = project(rows, gate_up_weight, packed=gate_up_packed)  # [n, 2I]
        hidden = F.silu(gate_up[:, : self.intermediate]) * gate_up[:, self.intermediate :]  # [n, I]
        return project(hidden, down_weight, packed=down_packed)  # [n, H]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert ids `[T, k]` and their renormalized weights `[T, k]` (float32)."""
        probs = torch.softmax(F.linear(x.float(), self.router_weight), dim=-1)  # [T, E]
        _, experts = torch.topk(probs + self.score_bias, self.top_k, dim=-1)  # [T, k]
        weights = probs.gather(-1, experts)  # [T, k]
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=self.norm_min)
        return experts, weights

    def forward_layer(self, h: torch.Tensor) -> torch.Tensor:  # [T, H] -> h + [T, H]
        """With `layer_kernel`: the layer's whole feed-forward half from the residual stream `h` after attention
        (the post-attention norm included)."""
        assert self.layer_kernel is not None
        return self._finish(self.layer_kernel.forward(h))

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:  # [T, H] -> residual + [T, H]
        if not self.adds_residual:  # the routed paths add onto it: a zero start makes this rank's share partial
            residual = torch.zeros_like(residual)
        if self.expert_qmoe is not None:  # QMoE weights the chosen experts itself: route only to choose them
            logits = F.linear(x.float(), self.router_weight)  # [T, E]
            _, experts = torch.topk(torch.softmax(logits, dim=-1) + self.score_bias, self.top_k, dim=-1)  # [T, k]
            out = residual + self.expert_qmoe.forward(x, logits, experts)  # [T, H]
            return self._finish(self.shared(x, out) if self.shared is not None else out)
        experts, weights = self.route(x)
        if self.routed_hook is not None:
            out = self.routed_hook(x, experts, weights, residual)
            return self._finish(self.shared(x, out) if self.shared is not None else out)
        # (with fbgemm int8 GEMM or torch int8/int4 kernel copies, every step takes the grouped path: at one row
        # they beat the row sums, and the int kernels replaced the rows the row sums read)
        first = self.expert_weights[0][0]
        gemm_kernels = self.quantized and (first.packed is not None or first.device_kernel is not None)  # type: ignore[union-attr]
        if not gemm_kernels and sums_weight_rows(x, max_rows=FEW_TOKEN_ASSIGNMENTS // self.top_k):
            few_tokens = self._forward_few_tokens_quantized if self.quantized else self._forward_few_tokens
            out = few_tokens(x, experts, weights, residual)
        else:
            out = self._forward_grouped(x, experts, weights, residual)
        return self._finish(self.shared(x, out) if self.shared is not None else out)

    def _forward_grouped(
        self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, residual: torch.Tensor
    ) -> torch.Tensor:  # x [T, H], experts and weights [T, k] -> residual + routed experts [T, H]
        flat_experts = experts.flatten()  # [T*k]
        order = torch.argsort(flat_experts, stable=True)  # [T*k] assignments grouped by expert
        token_of = order // self.top_k  # [T*k] source token of each sorted assignment
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        x_sorted = x.index_select(0, token_of)  # [T*k, H]
        # [n_e, H] views, one per expert that has rows
        outputs = [self.run_expert(e, rows) for e, rows in enumerate(x_sorted.split(counts)) if rows.shape[0]]
        y_sorted = torch.cat(outputs)  # [T*k, H], still grouped by expert
        y_sorted *= weights.flatten().index_select(0, order).unsqueeze(-1).to(y_sorted.dtype)
        return residual.index_add(0, token_of, y_sorted)  # [T, H]

    def _forward_few_tokens(
        self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, residual: torch.Tensor
    ) -> torch.Tensor:  # x [T, H], experts and weights [T, k] -> residual + routed experts [T, H]
        """All routed experts of a few tokens in two `embedding_bag` calls over the stacked expert weights.

        With the weights as row tables (`[E*H, 2I]`, `[E*I, H]`), `x @ W_e` is the sum of W_e's rows weighted by
        x, which is what `embedding_bag(mode="sum", per_sample_weights=...)` computes: one bag per (token,
        expert) gives every gate|up projection at once, and bags over the down rows, weighted by the activations
        times the routing weight, give each token's weighted sum of its experts' outputs directly. Measured here
        it is 1.2-2x faster than GEMMs per expert up to ~16 tokens, in a fraction of the calls."""
        tokens, h = x.shape
        i, k = self.intermediate, self.top_k
        flat_experts = experts.flatten()  # [T*k]
        gate_up = F.embedding_bag(
            self.expert_input_rows.index_select(0, flat_experts).flatten(),  # [T*k*H]
            self.gate_up_weight.view(-1, 2 * i),  # [E*H, 2I]
            _expert_bag_starts(tokens, k, h),
            mode="sum",
            per_sample_weights=x.unsqueeze(1).expand(tokens, k, h).flatten(),  # [T*k*H]
        )  # [T*k, 2I]
        hidden = F.silu(gate_up[:, :i]) * gate_up[:, i:] * weights.view(-1, 1).to(x.dtype)  # [T*k, I]
        # one bag per token over its k experts' down rows; a lone token's split over the threads
        down_starts = split_bags(k * i) if tokens == 1 else _token_bag_starts(tokens, k * i)
        routed = F.embedding_bag(
            self.expert_hidden_rows.index_select(0, flat_experts).flatten(),  # [T*k*I]
            self.down_weight.view(-1, h),  # [E*I, H]
            down_starts,
            mode="sum",
            per_sample_weights=hidden.flatten(),
        )  # [T, H], or [threads, H] parts of a lone token's sum
        if routed.shape[0] != tokens:
            routed = routed.sum(0, keepdim=True)
        return residual + routed

    def _forward_few_tokens_quantized(
        self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor, residual: torch.Tensor
    ) -> torch.Tensor:  # x [T, H], experts and weights [T, k] -> residual + routed experts [T, H]
        """`_forward_few_tokens` over quantized experts: the same row sums, one bag per (token, expert) for
        the down projection too, since each expert's output channels have their own scales and must be scaled
        before the experts' outputs are added."""
        tokens, h = x.shape
        i, k = self.intermediate, self.top_k
        assert isinstance(self.gate_up_weight, QuantizedWeight) and isinstance(self.down_weight, QuantizedWeight)
        flat_experts = experts.flatten()  # [T*k]
        inputs = x.unsqueeze(1).expand(tokens, k, h).reshape(tokens * k, h)  # [T*k, H]
        gate_up = stacked_row_sums(self.gate_up_weight, inputs, flat_experts)  # [T*k, 2I]
        hidden = F.silu(gate_up[:, :i]) * gate_up[:, i:] * weights.view(-1, 1).to(x.dtype)  # [T*k, I]
        routed = stacked_row_sums(self.down_weight, hidden, flat_experts)  # [T*k, H]
        return residual + routed.view(tokens, k, h).sum(1)


class DecoderLayer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer: int,
        dtype: torch.dtype,
        device: torch.device,
        quant: QuantSpec | None = None,
    ) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.attn = Attention(config, dtype, device, quant)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.mlp: nn.Module
        if config.is_moe_layer(layer):
            self.mlp = SparseMoE(config, dtype, device, quant)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, config.use_bias, dtype, device, quant)

    def fuse_for_onnxruntime(self, policy: str, next_layer: DecoderLayer | None = None) -> None:
        """Called after loading, before the layer's quantized weights (and `next_layer`'s) are packed, with
        `--cpu-quantized-kernels` `policy`: the attention's input half as one session (unless the previous
        layer's took it), the MLP or MoE as one (from the attention's output on, and on to `next_layer`'s
        attention input half, where each can join), where onnxruntime takes their matrices (see each block's
        `fuse_for_onnxruntime`)."""
        self.attn.fuse_for_onnxruntime(policy, self.input_norm)
        following, next_attention = None, None
        # (only a session from the attention's output on ends at the whole residual stream: one device)
        if next_layer is not None and self.attn.output_codes(policy) is not None:
            following = next_layer.attn
            next_attention = following.input_parts(policy, next_layer.input_norm)
        self.mlp.fuse_for_onnxruntime(policy, self.post_attention_norm, self.attn, next_attention)
        kernel = self.mlp.layer_kernel
        if following is not None and kernel is not None and kernel.next_widths is not None:
            matrix = _matrix(following.qkv_weight)
            assert isinstance(matrix, QuantMatrix)
            matrix.device_kernel = FusedPart(0)  # (its bytes are counted in this layer's session)
            following.input_from_previous_layer = True
        if isinstance(self.mlp, SparseMoE) and self.mlp.shared is not None:  # where it did not join the layer's
            self.mlp.shared.fuse_for_onnxruntime(policy)

    def forward(
        self,
        x: torch.Tensor,  # [T, H] the residual stream
        rope: RopeFactors,
        kv_cache: torch.Tensor,  # [N, 2, K, D]
        meta: AttentionMetadata,
        computed: tuple[torch.Tensor, torch.Tensor] | None = None,  # its attention's input, from the previous layer
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:  # [T, H], the next layer's, where computed
        attended = self.attn(x, rope, kv_cache, meta, self.input_norm, computed)  # [T, Q*D]
        kernel = self.mlp.layer_kernel
        if kernel is not None and kernel.takes_attention:  # (one device: nothing to reduce)
            if kernel.next_widths is not None:
                assert rope.cos is not None and rope.sin is not None
                y, q, kv = kernel.forward_chained(attended, x, rope.cos, rope.sin)
                return y, (q, kv)
            return kernel.forward_after_attention(attended, x), None
        h = self.attn.output(attended, x)  # [T, H]
        if kernel is not None:
            return self.mlp.forward_layer(h), None
        return self.mlp(self.post_attention_norm(h), h), None


class ErnieForCausalLM(nn.Module):
    """Both ERNIE 4.5 architectures: dense layers and MoE layers are chosen per layer from the config.

    With `quantization`, every projection (attention, dense MLPs, routed and shared experts) is stored
    quantized; embeddings, norms and routers stay in `dtype`. `quantize_lm_head` stores the LM head quantized
    too, as `[H, V]` rows; with tied embeddings that is a quantized copy of the embedding, made by
    `quantize_tied_lm_head` once the embedding is loaded (the embedding itself stays full precision)."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        quantization: QuantSpec | None = None,
        quantize_lm_head: bool = False,
        int8_activations: bool = False,
        exact_quantized_kernels: bool = False,
        cpu_quantized_kernels: str = "torch",
    ) -> None:
        super().__init__()
        self.config = config
        self.quantization = quantization
        self.int8_activations = int8_activations  # wint8 products by fbgemm's W8A8 GEMM (prepare_for_inference)
        # on CPU, keep the float32 row sums / dequantized products instead of torch's bf16-activation kernels
        self.exact_quantized_kernels = exact_quantized_kernels
        # otherwise, whose int kernels: "auto", "onnxruntime" or "torch" (ort_kernels.uses_onnxruntime)
        self.cpu_quantized_kernels = cpu_quantized_kernels
        self.embed_weight = _param(config.vocab_size, config.hidden_size, dtype=dtype, device=device)  # [V, H]
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, dtype, device, quantization) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device)
        self.lm_head_quantized: QuantizedWeight | None = None  # [H, V] rows, when the head is quantized
        self.lm_head_weight: nn.Parameter | None = None  # [V, H] float head, when it is not
        if quantization is not None and quantize_lm_head:
            self.lm_head_quantized = QuantizedWeight(1, config.hidden_size, config.vocab_size, quantization, device)
        elif config.tie_word_embeddings:
            self.lm_head_weight = self.embed_weight
        else:
            self.lm_head_weight = _param(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.lm_head_packed: torch.Tensor | None = None  # see prepare_for_inference
        self.head_kernel: NormedHeadKernel | None = None  # the final norm and a quantized head in onnxruntime
        # whether some layer rotates in onnxruntime (AttentionInputKernel; see prepare_for_inference), in torch
        self.rope_in_onnxruntime, self.rope_in_torch = False, True
        # vocab parallelism (parallel.py): the embedding lookup `[T] -> [T, H]` over this rank's rows, and the
        # gathering of every rank's logits `[S, V/N]` into `[S, V]` on the rank that samples
        self.embed_hook: Hook | None = None
        self.logits_hook: Hook | None = None
        half = config.head_dim // 2
        inv_freq = 1.0 / config.rope_theta ** (
            torch.arange(half, dtype=torch.float32, device=device) * 2 / config.head_dim
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [D/2]

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[torch.Tensor],  # per layer, [N, 2, K, D]
        meta: AttentionMetadata,
        sample_rows: torch.Tensor,  # [S] rows whose next-token logits are wanted
    ) -> torch.Tensor:  # [S, V] float32
        hook = self.embed_hook
        x = F.embedding(input_ids, self.embed_weight) if hook is None else hook(input_ids)  # [T, H]
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        rope = RopeFactors()
        if self.rope_in_torch:
            rope.rotation = torch.polar(torch.ones_like(angles), angles).unsqueeze(1)  # [T, 1, D/2] cos + i sin
        if self.rope_in_onnxruntime:
            rope.cos, rope.sin = torch.cos(angles), torch.sin(angles)  # [T, D/2] each
        computed = None  # a layer's attention input, where the previous layer's session computed it
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, computed = layer(x, rope, kv_cache, meta, computed)
        if sample_rows.shape[0] != x.shape[0]:  # else every row samples, in order
            x = x.index_select(0, sample_rows)
        if self.head_kernel is not None:
            logits = self.head_kernel.forward(x)  # [S, V] the norm included
        else:
            logits = self._lm_head(self.norm(x))  # [S, V]
        return logits if self.logits_hook is None else self.logits_hook(logits)

    def _lm_head(self, x: torch.Tensor) -> torch.Tensor:  # [S, H] -> [S, V] float32
        if self.lm_head_quantized is not None:
            return project(x.float(), self.lm_head_quantized)
        assert self.lm_head_weight is not None
        if self.lm_head_packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.lm_head_packed, None, "none", [], "")
        return F.linear(x, self.lm_head_weight).float()

    def prepare_for_inference(self) -> int:
        """Called once after the weights are loaded (unless `--no-cpu-weight-prepack`). On CPU in float32, every
        projection, expert and the LM head gets a oneDNN copy (`onednn_pack`): 1.5-3x faster than MKL's GEMM at
        decode batch sizes on these CPUs, for about the model's size again in memory (the plain weights stay:
        single rows are multiplied from them, except by the LM head, which always uses its copy). Returns the
        bytes the copies take (0 elsewhere). Quantized weights are repacked instead, in place of their row-wise
        codes, for the int kernels (`QuantizedWeight.pack_for_device`): always on CUDA (torch's), and on the CPU
        (`cpu_quantized_kernels`: onnxruntime's, torch's, or by shape) unless `exact_quantized_kernels` or
        `int8_activations` asks for the float32 or fbgemm kernels. On the CPU, each decoder layer is fused first
        where its matrices go to onnxruntime (`DecoderLayer.fuse_for_onnxruntime`: the attention's norm, q|k|v
        and RoPE as one session, a MoE layer from the attention's output on as one, an MLP or expert whose
        matrices both go there as one), and onnxruntime's sessions
        share its process-wide pool where they hold most quantized bytes (`ort_kernels.share_thread_pool`)."""
        quantized = [m for m in self.modules() if isinstance(m, QuantizedWeight)]
        on_cuda = self.embed_weight.device.type == "cuda"
        if on_cuda or (quantized and not self.int8_activations and not self.exact_quantized_kernels):
            if on_cuda:
                for weight in quantized:
                    weight.pack_for_device()
                return 0
            # onnxruntime's sessions share one spinning pool where they will hold most quantized bytes (torch
            # then runs on one thread: the backend's `_hand_cores_to_onnxruntime`, by the same rule)
            if onnxruntime_share(quantized, self.cpu_quantized_kernels) >= 0.5:
                share_thread_pool(torch.get_num_threads())
            # the decoder layer that owns each weight, to fuse first (once: its fused matrices then have kernels)
            owners = {id(w): layer for layer in self.layers for w in layer.modules() if isinstance(w, QuantizedWeight)}
            following = dict(zip(map(id, self.layers), [*self.layers[1:], None], strict=True))
            fused: set[int] = set()
            if self.cpu_quantized_kernels != "torch":
                self._fuse_head_for_onnxruntime()
            for weight in progress(quantized, "repacking quantized weights", unit="weight"):
                owner = owners.get(id(weight))
                if owner is not None and id(owner) not in fused and self.cpu_quantized_kernels != "torch":
                    owner.fuse_for_onnxruntime(self.cpu_quantized_kernels, following[id(owner)])
                    fused.add(id(owner))
                # releases the row-wise codes at once, so at most one layer's are held twice
                weight.pack_for_device(self.cpu_quantized_kernels)
                trim_heap()  # the packing's temporaries, freed, would stay in the heap (malloc.py)
            attentions = [layer.attn for layer in self.layers]
            in_onnxruntime = [a.input_kernel is not None or a.input_from_previous_layer for a in attentions]
            self.rope_in_onnxruntime, self.rope_in_torch = any(in_onnxruntime), not all(in_onnxruntime)
        packable = [m for m in self.modules() if isinstance(m, Attention | MLP | SparseMoE)]
        if self.quantization is not None and not self.int8_activations:
            packable = []  # every projection is quantized, and weight-only kernels need no copy
        extra = sum(m.pack_weights() for m in progress(packable, "repacking weights", unit="module"))
        if self.lm_head_quantized is not None:
            return extra + (self.lm_head_quantized.pack_for_gemm() if self.int8_activations else 0)
        assert self.lm_head_weight is not None
        self.lm_head_packed = onednn_pack(self.lm_head_weight)
        return extra + packed_bytes(self.lm_head_packed)

    def _fuse_head_for_onnxruntime(self) -> None:
        """Before the head's weight is packed: the final norm and a quantized head bound for onnxruntime as one
        session (`NormedHeadKernel`), where the head fits one."""
        if self.lm_head_quantized is None:
            return
        matrix = self.lm_head_quantized.matrix
        if matrix.rows.device.type != "cpu" or matrix.device_kernel is not None:
            return
        hidden, vocab, spec = matrix.in_features, matrix.out_features, matrix.spec
        if hidden * vocab > PIECE_WEIGHTS or not uses_onnxruntime(self.cpu_quantized_kernels, spec, hidden, vocab):
            return
        head = (matrix.codes().t(), matrix.scales)  # [V, H], [G, V]
        self.head_kernel = NormedHeadKernel.pack(self.norm.weight, self.norm.eps, head, spec)
        matrix.device_kernel = FusedPart(self.head_kernel.nbytes())

    @torch.inference_mode()
    def quantize_tied_lm_head(self) -> None:
        """Called once after the weights are loaded: with tied embeddings and a quantized head, quantize the
        head from the loaded embedding, a block of vocabulary rows at a time (each block's float temporaries
        stay small)."""
        if self.lm_head_quantized is None or not self.config.tie_word_embeddings:
            return
        block = 8192
        for start in range(0, self.config.vocab_size, block):
            stop = min(start + block, self.config.vocab_size)
            self.lm_head_quantized.fill(0, slice(start, stop), self.embed_weight[start:stop])

    def weight_bytes(self) -> dict[str, int]:
        """Resident weight bytes by kind: `quantized` (codes and scales of quantized projections and head) and
        `full_precision` (everything else: embeddings, norms, routers, float projections); kernel copies made
        by `prepare_for_inference` are not counted here (it returns their size)."""
        quantized = sum(m.nbytes() for m in self.modules() if isinstance(m, QuantizedWeight))
        full = sum(p.numel() * p.element_size() for p in self.parameters())  # a tied head is counted once
        return {"quantized": quantized, "full_precision": full}

    # ----- checkpoint mapping -----
    def checkpoint_targets(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HuggingFace tensor name, the view of our parameter it fills), for every tensor the checkpoint must
        hold. Fused parameters (qkv, gate|up, stacked experts) are filled slice by slice; projections (all but
        the `[V, H]` embedding and LM head) are stored `[in, out]`, so their targets are transposed views in the
        checkpoint's `[out, in]` shape."""
        config = self.config
        yield "model.embed_tokens.weight", self.embed_weight
        yield "model.norm.weight", self.norm.weight
        if not config.tie_word_embeddings:
            if self.lm_head_quantized is not None:  # [V, H] is the head's [out, in]
                yield "lm_head.weight", self.lm_head_quantized.target()
            else:
                assert self.lm_head_weight is not None
                yield "lm_head.weight", self.lm_head_weight
        q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
        for i, layer in enumerate(self.layers):
            prefix = f"model.layers.{i}"
            yield f"{prefix}.input_layernorm.weight", layer.input_norm.weight
            yield f"{prefix}.post_attention_layernorm.weight", layer.post_attention_norm.weight
            attn = layer.attn
            splits = {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}
            for name, columns in splits.items():
                yield f"{prefix}.self_attn.{name}_proj.weight", _target(attn.qkv_weight, None, columns)
                if attn.qkv_bias is not None:
                    yield f"{prefix}.self_attn.{name}_proj.bias", attn.qkv_bias[columns]
            yield f"{prefix}.self_attn.o_proj.weight", _target(attn.o_weight, None, slice(0, config.hidden_size))
            if attn.o_bias is not None:
                yield f"{prefix}.self_attn.o_proj.bias", attn.o_bias
            mlp = layer.mlp
            if isinstance(mlp, SparseMoE):
                yield f"{prefix}.mlp.gate.weight", mlp.router_weight
                yield f"{prefix}.mlp.moe_statics.e_score_correction_bias", mlp.score_bias.view(1, -1)
                n, h = mlp.intermediate, config.hidden_size
                for e in range(mlp.num_experts):
                    yield f"{prefix}.mlp.experts.{e}.gate_proj.weight", _target(mlp.gate_up_weight, e, slice(0, n))
                    yield f"{prefix}.mlp.experts.{e}.up_proj.weight", _target(mlp.gate_up_weight, e, slice(n, 2 * n))
                    yield f"{prefix}.mlp.experts.{e}.down_proj.weight", _target(mlp.down_weight, e, slice(0, h))
                if mlp.shared is not None:
                    yield from _mlp_targets(f"{prefix}.mlp.shared_experts", mlp.shared)
            else:
                yield from _mlp_targets(f"{prefix}.mlp", mlp)


def _mlp_targets(prefix: str, mlp: MLP) -> Iterator[tuple[str, torch.Tensor]]:
    n = mlp.intermediate
    hidden = mlp.down_weight.out_features if isinstance(mlp.down_weight, QuantizedWeight) else mlp.down_weight.shape[1]
    yield f"{prefix}.gate_proj.weight", _target(mlp.gate_up_weight, None, slice(0, n))
    yield f"{prefix}.up_proj.weight", _target(mlp.gate_up_weight, None, slice(n, 2 * n))
    yield f"{prefix}.down_proj.weight", _target(mlp.down_weight, None, slice(0, hidden))
    if mlp.gate_up_bias is not None:
        yield f"{prefix}.gate_proj.bias", mlp.gate_up_bias[:n]
        yield f"{prefix}.up_proj.bias", mlp.gate_up_bias[n:]
    if mlp.down_bias is not None:  # (a tensor-parallel rank but the first has none: rank 0 adds it)
        yield f"{prefix}.down_proj.bias", mlp.down_bias
