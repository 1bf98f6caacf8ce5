"""Quantized projection weights for the torch backend (`--quantization wint8|wint4`) and their kernels.

Storage: a weight the model multiplies as `x @ W` with `W` `[in, out]` (leading dims: stacked experts) is kept
in fbgemm's row-wise quantized embedding layout, one row per input channel: the output channels' codes (int8
stored as `q + 128`, or int4 as `q + 8` two per byte, low nibble first), then the row's scale and bias (float32
for 8 bits, float16 for 4), always 1 and -128 (-8). fbgemm's `embedding_bag_{byte,4bit}_rowwise_offsets`
then compute `sum_i x_i * q[i, :]` exactly (integer codes times float activations, no activation
quantization), and the per-output-channel (or per group of input rows) scales are applied to that small
result: weight-only quantization. The scales are `[G, out]` float32 (G groups of input rows, 1 per channel).

Kernels (docs/quantization.md has the measurements behind the choice): by default, after loading, each weight is
repacked for torch's weight-only kernels and its row-wise codes are let go (`pack_for_device`): on CPU
`_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` at every row count, bfloat16 activations, except that
large 4-bit matrices go to onnxruntime's `MatMulNBits` where it is installed (`ort_kernels.py`). With
`--exact-quantized-kernels` the row-wise codes stay and are multiplied exactly in float32: one row (decode) as
the weighted row sums above, several rows through a dequantized float32 copy; or, for wint8 with
`--int8-activations`, by fbgemm's int8 GEMM (`quantized.linear_dynamic`) on a packed copy, which also quantizes
the activations per call (W8A8-dynamic, not weight-only).

On CUDA the codes are repacked the same way for torch's CUDA kernels: wint4 in tinygemm's tensor-core layout for
`_weight_int4pack_mm` (bfloat16 activations, groups of 32-256 input rows; per-channel scales are repeated over
groups of 128), wint8 as an `[out, in]` int8 matrix multiplied by `_weight_int8pack_mm` for a few rows and as a
bfloat16 copy made per call for more. The CUDA paths ran once on a GPU, inside `gpu_check --quantization`'s
21B-A3B accuracy rows; their own tests (tests/backends/torch/test_quant.py, `-k cuda`) have not run on one.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ernie_serve.backends.torch.ort_kernels import FusedPart, NBitsKernel, uses_onnxruntime
from ernie_serve.quantization import QuantSpec, rounded_codes, storage_bytes

_BYTE_BAGS = torch.ops.quantized.embedding_bag_byte_rowwise_offsets
_4BIT_BAGS = torch.ops.quantized.embedding_bag_4bit_rowwise_offsets
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what tinygemm's int4 kernels take
CPU_PACK_ROWS = 4096  # output channels `Int4Kernel.pack` converts at a time on CPU (a multiple of 64)
INT8_KERNEL_MAX_ROWS = 8  # above this, wint8 on CUDA multiplies a bfloat16 copy (the int8 kernel is a GEMV)


def row_tail(spec: QuantSpec) -> torch.Tensor:
    """The bytes after each row's codes: scale 1 and bias -128 (fp32) for 8 bits, 1 and -8 (fp16) for 4,
    so a row's dequantized values are exactly its signed codes."""
    if spec.bits == 8:
        return torch.tensor([1.0, -128.0], dtype=torch.float32).view(torch.uint8)  # [8]
    return torch.tensor([1.0, -8.0], dtype=torch.float16).view(torch.uint8)  # [4]


def code_bytes(out_features: int, spec: QuantSpec) -> int:
    return out_features if spec.bits == 8 else out_features // 2


@functools.cache
def _arange(n: int) -> torch.Tensor:
    return torch.arange(n)


@dataclass
class QuantMatrix:
    """One quantized `[in, out]` matrix (a layer's weight, or one expert's): views into a `QuantizedWeight`'s
    storage, plus the optional fbgemm copy for several rows. What `project` multiplies by."""

    rows: torch.Tensor  # [in, code bytes + tail] uint8, fbgemm's row-wise layout
    scales: torch.Tensor  # [G, out] float32
    spec: QuantSpec
    out_features: int
    packed: Any = None  # fbgemm `linear_prepack` params of the same weight (wint8 with prepack), or None
    # the int kernels' copy (`pack_for_device`), or its share of an MLP's fused onnxruntime kernel
    device_kernel: Int4Kernel | Int8Kernel | NBitsKernel | FusedPart | None = None
    in_features: int = 0  # set from `rows`, which `release_rows` may empty

    def __post_init__(self) -> None:
        self.in_features = self.in_features or self.rows.shape[0]

    def row_sums(self, x: torch.Tensor, splits: torch.Tensor) -> torch.Tensor:
        """`x @ W` for one row `x` `[1, in]` as weighted sums of W's integer rows, then scaled: `[1, out]`.
        Per channel, the sum is split into bags at `splits` (one per thread, summed after); grouped, each group
        of input rows is one bag and its partial sum gets that group's scales."""
        gs = self.spec.group_size
        bags = _BYTE_BAGS if self.spec.bits == 8 else _4BIT_BAGS
        starts = splits if gs == 0 else _arange(self.scales.shape[0]) * gs
        parts = bags(self.rows, _arange(self.in_features), starts, False, 0, False, x[0])  # [bags, out]
        if gs == 0:
            return parts.sum(0, keepdim=True) * self.scales  # [1, out]
        return (parts * self.scales).sum(0, keepdim=True)  # [1, out] from [G, out] partials

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """`x @ W` for several rows `[T, in]` -> `[T, out]`: fbgemm's int8 GEMM on the packed copy when there is
        one, torch's CUDA kernels on the `pack_for_device` copy, else through a float copy of W made for this call."""
        if x.shape[0] == 0:  # a step whose sequences all stop mid-prompt asks the LM head for no rows
            return x.new_empty(0, self.out_features)
        if self.device_kernel is not None:
            return self.device_kernel.matmul(x)
        if self.packed is not None:
            # reduce_range: 7-bit activations, so AVX2's 16-bit pairwise products cannot saturate
            return torch.ops.quantized.linear_dynamic(x, self.packed, True)
        return torch.mm(x, self.dequantize().to(x.dtype))  # on a GPU: bfloat16, no custom kernel yet

    def dequantize(self) -> torch.Tensor:
        """The float32 `[in, out]` weight this matrix stands for."""
        codes = self.codes().float()  # [in, out]
        gs, groups = self.spec.group_size, self.scales.shape[0]
        if gs == 0:
            return codes.mul_(self.scales)
        if groups * gs == self.in_features:
            return codes.view(groups, gs, -1).mul_(self.scales.unsqueeze(1)).view(self.in_features, -1)
        return codes.mul_(self.scales.repeat_interleave(gs, 0)[: self.in_features])  # short last group

    def codes(self, columns: slice | None = None) -> torch.Tensor:
        """The signed integer codes `[in, out]` (int16 for 8 bits, int8 for 4), or those of output `columns`
        only (`[in, columns]`; for 4 bits an even start and stop)."""
        if self.rows.shape[0] != self.in_features:
            raise RuntimeError("the row-wise codes were released after packing for the device kernels")
        start, stop = (0, self.out_features) if columns is None else (columns.start, columns.stop)
        per_byte = 8 // self.spec.bits
        stored = self.rows[:, start // per_byte : stop // per_byte]
        if self.spec.bits == 8:
            return stored.to(torch.int16) - 128
        low = (stored & 0x0F).to(torch.int8) - 8
        high = (stored >> 4).to(torch.int8) - 8
        return torch.stack((low, high), dim=-1).flatten(-2)

    def pack_for_gemm(self) -> int:
        """Make the fbgemm int8 copy for several rows (wint8 only; the int4 schemes have no int4 GEMM here that
        beats dequantizing). Returns the bytes it takes (estimated: fbgemm does not report them)."""
        if self.spec.bits != 8 or self.rows.device.type != "cpu":  # fbgemm is CPU-only
            return 0
        codes = self.codes().t().to(torch.int8).contiguous()  # [out, in]
        scales = self.scales[0].double()  # [out]
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # quantize_per_channel is deprecated, but it is fbgemm's only door
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(codes, scales, zero_points, 0)
        self.packed = torch.ops.quantized.linear_prepack(qweight, None)
        return codes.numel() + self.out_features * 8

    def pack_for_device(self, cpu_kernels: str = "torch") -> int:
        """Make the copy the int kernels multiply (see the module docstring): on CPU onnxruntime's where
        `cpu_kernels` ("auto", "onnxruntime" or "torch": `ort_kernels.uses_onnxruntime`) says so, else torch's;
        the bytes it takes, or 0 where the shapes do not fit them (the matrix keeps dequantizing per call then)."""
        onnxruntime = uses_onnxruntime(cpu_kernels, self.spec, self.in_features, self.out_features)
        if onnxruntime and self.rows.device.type == "cpu":  # its codes a piece of output columns at a time
            self.device_kernel = NBitsKernel.pack(
                lambda columns: self.codes(columns).t(), self.scales, self.spec, self.in_features
            )
            return self.device_kernel.nbytes()
        codes = self.codes().t().contiguous()  # [out, in] signed
        if self.spec.bits == 8:
            self.device_kernel = Int8Kernel(codes.to(torch.int8), self.scales[0].clone())
        else:
            self.device_kernel = Int4Kernel.pack(codes, self.scales, self.spec.group_size)
        return self.device_kernel.nbytes() if self.device_kernel is not None else 0


@dataclass
class Int8Kernel:
    """wint8 for CUDA and for torch's CPU kernel: `[out, in]` int8 codes and their per-channel scales."""

    codes: torch.Tensor  # [out, in] int8
    scales: torch.Tensor  # [out] float32
    unit_scales: torch.Tensor | None = None  # [out] ones in the activations' dtype: what the kernel is given

    def __post_init__(self) -> None:
        self._unit_scales(torch.bfloat16)  # the dtype the CPU kernel takes and CUDA models mostly run in

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out] in x's dtype
        # The scales multiply the kernel's output in float32 rather than going in with the activations' dtype:
        # bfloat16 puts every output channel's scale off by up to 0.4%, the same way at every position (on the
        # trained model, ernie_serve.testing.trained, wint8's top-1 agreement rose from 98.77% to 99.11% on the
        # CPU; no slower). The sums themselves are still rounded to bfloat16 by the kernel.
        if x.is_cuda:
            if x.shape[0] > INT8_KERNEL_MAX_ROWS:
                sums = torch.mm(x, self.codes.t().to(x.dtype))  # [T, out]
            else:
                sums = torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.codes, self._unit_scales(x.dtype))
        else:  # any row count, bfloat16 activations: float32 ones take a path 10-40x slower
            x_bf16 = x.to(torch.bfloat16).contiguous()
            sums = torch.ops.aten._weight_int8pack_mm(x_bf16, self.codes, self._unit_scales(torch.bfloat16))
        return torch.mul(sums, self.scales).to(x.dtype)  # [T, out], scaled in float32

    def _unit_scales(self, dtype: torch.dtype) -> torch.Tensor:
        if self.unit_scales is None or self.unit_scales.dtype != dtype:
            self.unit_scales = torch.ones(self.scales.shape, dtype=dtype, device=self.codes.device)
        return self.unit_scales

    def nbytes(self) -> int:
        assert self.unit_scales is not None
        return self.codes.numel() + self.scales.numel() * 4 + self.unit_scales.numel() * self.unit_scales.element_size()


@dataclass
class Int4Kernel:
    """wint4 in tinygemm's layout: `_weight_int4pack_mm` on CUDA, `_weight_int4pack_mm_for_cpu` on CPU (which
    the tests run; serving on CPU uses the row sums). Dequantizes `(q + 8 - 8) * scale + 0`: our codes are
    symmetric, so every zero point is 0."""

    packed: torch.Tensor  # the kernel's own int4 layout
    scales_and_zeros: torch.Tensor  # [in / group, out, 2] bfloat16: scale, 0
    group_size: int

    @classmethod
    def pack(cls, codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> Int4Kernel | None:
        """From signed codes `[out, in]` and scales `[G, out]` (G = 1: per channel); None where tinygemm's
        shape rules (groups of 32-256 rows that tile the input, 8-channel output tiles) do not fit."""
        out_features, in_features = codes.shape
        group = group_size or 128  # per channel: any tiling group, each with the channel's one scale
        if group not in INT4_GROUP_SIZES or in_features % group or out_features % 8:
            return None
        groups = in_features // group
        if group_size == 0:
            scales = scales.expand(groups, out_features)  # [G, out] the one scale, repeated
        elif scales.shape[0] != groups:
            return None  # a short last group
        inner_k_tiles = next(t for t in (8, 4, 2) if in_features % (t * 16) == 0)
        if codes.is_cuda:  # two codes a byte along the input, the even one in the high nibble
            unsigned = (codes.to(torch.int16) + 8).to(torch.uint8)  # [out, in] 0..15
            nibbles = (unsigned[:, 0::2] << 4 | unsigned[:, 1::2]).contiguous()  # [out, in / 2]
            packed = torch.ops.aten._convert_weight_to_int4pack(nibbles, inner_k_tiles)
        else:  # the CPU op takes int32 codes, 4 bytes a weight (1 GiB for the 21B-A3B's LM head at once), and
            # packs output channels independently, so it takes them a block at a time (a test checks the blocks)
            blocks = codes.split(CPU_PACK_ROWS)  # [rows, in] each
            pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu
            packed = torch.cat([pack(block.to(torch.int32) + 8, inner_k_tiles) for block in blocks])
        scales_and_zeros = torch.stack((scales, torch.zeros_like(scales)), dim=-1).to(torch.bfloat16)
        return cls(packed, scales_and_zeros.contiguous(), group)  # [G, out, 2]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out] in x's dtype
        op = torch.ops.aten._weight_int4pack_mm if x.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
        out = op(x.to(torch.bfloat16).contiguous(), self.packed, self.group_size, self.scales_and_zeros)
        return out.to(x.dtype)

    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales_and_zeros.numel() * 2


class QuantTarget:
    """What one checkpoint tensor fills in a `QuantizedWeight`: the columns `columns` of matrix `index`.
    Quacks like the tensor views `checkpoint_targets` yields for full-precision weights (`shape` is the
    checkpoint's `[out, in]`, `copy_` takes the checkpoint tensor), so the loader treats both alike."""

    def __init__(self, weight: QuantizedWeight, index: int, columns: slice) -> None:
        self.weight, self.index, self.columns = weight, index, columns
        self.shape = torch.Size((columns.stop - columns.start, weight.in_features))

    def copy_(self, tensor: torch.Tensor) -> QuantTarget:
        """Quantize the checkpoint tensor `[out, in]` into its slice; the only full-precision temporaries are
        a few copies of this one tensor."""
        self.weight.fill(self.index, self.columns, tensor)
        return self


class QuantizedWeight(nn.Module):
    """A stack of `count` quantized `[in, out]` matrices (experts; 1 for a plain layer), allocated quantized
    from the start and filled tensor by tensor (`targets`), so the full-precision weight never exists."""

    def __init__(self, count: int, in_features: int, out_features: int, spec: QuantSpec, device: torch.device):
        super().__init__()
        if spec.bits == 4 and out_features % 2:
            raise ValueError(f"wint4 packs two output channels per byte: {out_features} is odd")
        self.spec, self.in_features, self.out_features = spec, in_features, out_features
        codes = code_bytes(out_features, spec)
        tail = row_tail(spec)
        rows = torch.empty(count, in_features, codes + tail.numel(), dtype=torch.uint8, device=device)
        rows[..., codes:] = tail.to(device)
        self.register_buffer("rows", rows)  # [count, in, bytes]
        groups = spec.num_groups(in_features)
        self.register_buffer("scales", torch.ones(count, groups, out_features, device=device))  # [count, G, out]
        self.matrices = [
            QuantMatrix(r, s, spec, out_features) for r, s in zip(rows.unbind(0), self.scales.unbind(0), strict=True)
        ]

    @property
    def matrix(self) -> QuantMatrix:
        """The one matrix of an unstacked weight."""
        return self.matrices[0]

    def target(self, index: int = 0, columns: slice | None = None) -> QuantTarget:
        return QuantTarget(self, index, columns if columns is not None else slice(0, self.out_features))

    @torch.inference_mode()
    def fill(self, index: int, columns: slice, weight: torch.Tensor) -> None:
        """Quantize `weight` `[out slice, in]` (any float dtype) into columns `columns` of matrix `index`."""
        codes, scales = rounded_codes(weight, self.spec)  # [o, in] whole numbers (float32), [o, G]
        self.scales[index, :, columns] = scales.t()
        unsigned = codes.add_(self.spec.qmax + 1)  # [o, in] the stored codes, q + 128 or q + 8
        if self.spec.bits == 8:
            self.rows[index, :, columns] = unsigned.t()  # converts to uint8 in the copy (whole numbers: exact)
        else:
            if columns.start % 2 or columns.stop % 2:
                raise ValueError(f"wint4 columns must start and end on even channels, got {columns}")
            # two codes a byte, the even channel in the low nibble (`pack_int4`'s layout), summed in float: exact;
            # pairs are adjacent rows here, so this reads contiguously and only the copy below transposes
            packed = torch.addcmul(unsigned[0::2], unsigned[1::2], torch.tensor(16.0))  # [o/2, in]
            self.rows[index, :, columns.start // 2 : columns.stop // 2] = packed.t()

    def dequantized(self, index: int = 0) -> torch.Tensor:
        """The float32 `[out, in]` weight matrix `index` stands for (the checkpoint's layout): for tests and
        the dequantized-weights reference model."""
        return self.matrices[index].dequantize().t()

    def pack_for_gemm(self) -> int:
        return sum(m.pack_for_gemm() for m in self.matrices)

    def onnxruntime_bytes(self) -> int:
        """The bytes of this stack's matrices that onnxruntime's kernels hold (`pack_for_device`)."""
        onnxruntime = (NBitsKernel, FusedPart)
        return sum(m.device_kernel.nbytes() for m in self.matrices if isinstance(m.device_kernel, onnxruntime))

    def pack_for_device(self, cpu_kernels: str = "torch") -> None:
        """Called once after loading (on CPU unless the exact kernels were asked for): give every matrix its
        copy for the int kernels (`cpu_kernels`: "auto", "onnxruntime" or "torch" on CPU; CUDA always torch's)
        and, where all of them got one, let go of the row-wise codes and the scales, which nothing reads any more
        (`nbytes` counts what is kept)."""
        for matrix in self.matrices:
            if matrix.device_kernel is None:  # not already part of a fused session (ort_kernels.FusedPart)
                matrix.pack_for_device(cpu_kernels)
        if all(m.device_kernel is not None for m in self.matrices):  # the kernels hold their own scales too
            count, _, width = self.rows.shape
            self.rows = self.rows.new_empty(count, 0, width)  # new tensors: a view would keep the storage
            self.scales = self.scales.new_empty(count, 0, self.out_features)
            for matrix, rows, scales in zip(self.matrices, self.rows.unbind(0), self.scales.unbind(0), strict=True):
                matrix.rows, matrix.scales = rows, scales

    def nbytes(self) -> int:
        kernels = sum(m.device_kernel.nbytes() for m in self.matrices if m.device_kernel is not None)
        return self.rows.numel() + self.scales.numel() * self.scales.element_size() + kernels


def onnxruntime_share(weights: list[QuantizedWeight], cpu_kernels: str) -> float:
    """The fraction of these CPU weights' quantized bytes that `pack_for_device(cpu_kernels)` will give to
    onnxruntime (0 for none)."""
    sizes = [(w, w.rows.shape[0] * storage_bytes(w.out_features, w.in_features, w.spec)) for w in weights]
    total = sum(size for _, size in sizes)
    held = sum(size for w, size in sizes if uses_onnxruntime(cpu_kernels, w.spec, w.in_features, w.out_features))
    return held / total if total else 0.0


def stacked_row_sums(
    weight: QuantizedWeight,
    x: torch.Tensor,  # [B, in] one input per bag
    which: torch.Tensor,  # [B] the matrix (expert) each bag multiplies by
) -> torch.Tensor:  # [B, out]
    """`x[b] @ W[which[b]]` for a few bags at once, as one fbgemm call over the stacked rows (`[count*in, bytes]`),
    then scaled per output channel (or per group of input rows) of each bag's matrix."""
    bags, in_features = x.shape
    gs, groups = weight.spec.group_size, weight.scales.shape[1]
    op = _BYTE_BAGS if weight.spec.bits == 8 else _4BIT_BAGS
    indices = (which[:, None] * in_features + _arange(in_features)).flatten()  # [B*in]
    # one bag per (input, group) of rows: groups start every `gs` rows within each input's rows
    offsets = (_arange(bags)[:, None] * in_features + _arange(groups) * (gs or in_features)).flatten()  # [B*G]
    table = weight.rows.view(-1, weight.rows.shape[-1])  # [count*in, bytes]
    parts = op(table, indices, offsets, False, 0, False, x.flatten())  # [B*G, out]
    scales = weight.scales.index_select(0, which)  # [B, G, out]
    return (parts.view(bags, groups, -1) * scales).sum(1)  # [B, out]
