"""Weight-only quantization math shared by every backend: symmetric int8 / int4 with one scale per output
channel, or (int4) one per group of input channels. Plain torch, no kernels: backends store the results in
whatever layout their kernels read (the torch backend in `backends/torch/quant.py`).

Conventions: a weight is `[..., out, in]` (a linear layer's, as checkpoints store it; leading dims are stacked
experts). `wint8` stores `q` in [-127, 127] and `wint4` in [-7, 7] (symmetric: the code -8 is never used, so a
weight and its negation round alike), and the weight is `q * scale`. Scales are `[..., out, G]` float32 with
`G = ceil(in / group_size)` groups of `group_size` input channels (the last group may be shorter), or `G = 1`
per output channel.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

SCHEMES = ("wint8", "wint4")
GROUP_SIZES = (64, 128)  # --quantization-group-size choices for wint4; 0 = one scale per output channel


@dataclass(frozen=True)
class QuantSpec:
    """One quantization scheme and its grouping."""

    scheme: str  # "wint8" or "wint4"
    group_size: int = 0  # input channels per scale; 0: one scale per output channel (always so for wint8)

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown quantization {self.scheme!r}; choose {' or '.join(SCHEMES)}")
        if self.group_size < 0:
            raise ValueError("group_size must be 0 (per output channel) or positive")

    @classmethod
    def of(cls, scheme: str, group_size: int | None) -> QuantSpec:
        """The spec for `--quantization scheme --quantization-group-size group_size` (-1: per output channel);
        int8 is always per channel (FastDeploy's weight_only_int8), so the group size applies to wint4 only."""
        return cls(scheme, max(group_size or 0, 0) if scheme == "wint4" else 0)

    @property
    def bits(self) -> int:
        return 8 if self.scheme == "wint8" else 4

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1  # 127 / 7

    def num_groups(self, in_features: int) -> int:
        return 1 if self.group_size == 0 else math.ceil(in_features / self.group_size)

    def describe(self) -> str:
        grouping = "per output channel" if self.group_size == 0 else f"groups of {self.group_size}"
        return f"{self.scheme} ({grouping})"


def group_view(weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """`[..., out, in]` -> `[..., out, G, g]`, the last group zero-padded to full length (zeros never raise a
    group's maximum, and padded codes are dropped again)."""
    in_features = weight.shape[-1]
    groups = spec.num_groups(in_features)
    size = in_features if spec.group_size == 0 else spec.group_size
    pad = groups * size - in_features
    if pad:
        weight = torch.nn.functional.pad(weight, (0, pad))
    return weight.view(*weight.shape[:-1], groups, size)


def rounded_codes(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize` with the codes still float32 (whole numbers in [-qmax, qmax]): what backends write into their
    own layouts without another integer pass. Few passes over the tensor on purpose: loading a 21B model
    quantizes 21 billion weights here."""
    in_features = weight.shape[-1]
    grouped = group_view(weight.float(), spec)  # [..., out, G, g]
    low, high = torch.aminmax(grouped, dim=-1)  # [..., out, G]
    scales = torch.maximum(high, -low) / spec.qmax
    # an all-zero group gets scale 1 (any would do): its codes are 0 either way, and nothing divides by 0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = (grouped * scales.reciprocal().unsqueeze(-1)).round_().clamp_(-spec.qmax, spec.qmax)
    return codes.flatten(-2)[..., :in_features], scales  # [..., out, in], [..., out, G]


def quantize(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest of a float weight `[..., out, in]`: codes int8 `[..., out, in]` in
    [-qmax, qmax] and float32 scales `[..., out, G]`, with `weight ~= codes * scales` per group. Called once per
    checkpoint tensor while loading, so its temporaries are a few copies of that one tensor."""
    codes, scales = rounded_codes(weight, spec)
    return codes.to(torch.int8), scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """float32 `[..., out, in]` from `quantize`'s codes and scales: the weight the quantized model computes with."""
    in_features = codes.shape[-1]
    grouped = group_view(codes.float(), spec)  # [..., out, G, g]
    return (grouped * scales.unsqueeze(-1)).flatten(-2)[..., :in_features]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes in [-8, 7], `[..., n]` with n even -> uint8 `[..., n / 2]`: code `2j` (offset by 8) in the low
    nibble of byte j and code `2j + 1` in the high one (fbgemm's 4-bit row layout)."""
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dimension, got {codes.shape[-1]}")
    unsigned = (codes.to(torch.int16) + 8).to(torch.uint8)  # [..., n] in 0..15
    return unsigned[..., 0::2] | (unsigned[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """`pack_int4`'s inverse: uint8 `[..., n / 2]` -> int8 codes `[..., n]`."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).flatten(-2)


NBITS_PER_CHANNEL_BLOCK = 128  # MatMulNBits' block for one scale per output channel (the scale repeated)


def matmul_nbits_layout(
    codes: torch.Tensor, scales: torch.Tensor, spec: QuantSpec, block: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Signed codes `[N, K]` and scales `[N, G]` in onnxruntime's `MatMulNBits` layout: B (uint8
    `[N, blocks, block * bits / 8]`: codes `q + 2^(bits-1)`, for 4 bits two a byte along K, low nibble first, the
    last block padded with code 0), its scales (float32 `[N * blocks]`) and the block size. No zero points: the
    op's default, `2^(bits-1)`, is the codes' offset. One scale per row (group size 0) is repeated over blocks of
    `NBITS_PER_CHANNEL_BLOCK` (the op takes power-of-two blocks of 16 or more, not one block of K), or of `block`
    where given (onnxruntime's `QMoE` stores the same bytes per expert, with a block that fits its two widths)."""
    n, k = codes.shape
    block = spec.group_size or block or NBITS_PER_CHANNEL_BLOCK
    blocks = -(-k // block)
    if spec.group_size == 0:
        scales = scales.expand(n, blocks)
    padded = torch.nn.functional.pad(codes.to(torch.int16), (0, blocks * block - k))  # [N, blocks * block]
    unsigned = (padded + 2 ** (spec.bits - 1)).to(torch.uint8)
    if spec.bits == 4:
        unsigned = unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)
    return unsigned.reshape(n, blocks, -1), scales.reshape(-1).float().contiguous(), block


def qmoe_block(spec: QuantSpec, hidden: int, intermediate: int) -> int | None:
    """The block along K for a layer's routed experts as one onnxruntime `QMoE` node or session, or None where
    QMoE cannot hold them.

    QMoE takes one block size for both products (K = hidden for gate/up, intermediate for down), a power of
    two of 16 or more that divides both. Groups of 64 or 128 are that block; one scale per output channel
    (wint8, and wint4 group size -1) is the largest such block up to 128, with the row's scale repeated.
    """
    if spec.group_size:
        return spec.group_size if hidden % spec.group_size == 0 and intermediate % spec.group_size == 0 else None
    for block in (128, 64, 32, 16):
        if hidden % block == 0 and intermediate % block == 0:
            return block
    return None


def qmoe_layout(
    codes: torch.Tensor, scales: torch.Tensor, spec: QuantSpec, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert matrix's signed codes `[N, K]` and scales `[N, G]` in `QMoE`'s layout: codes uint8
    `[N, K * bits / 8]` and float32 scales `[N, K / block]`, the bytes of `matmul_nbits_layout` with `block`
    (`qmoe_block`: it divides K, so no block is padded), one row per output channel. A layer's experts are
    stacked along a new first dimension."""
    packed, block_scales, _ = matmul_nbits_layout(codes, scales, spec, block)  # [N, K/block, ...], [N * K/block]
    n = codes.shape[0]
    return packed.reshape(n, -1), block_scales.reshape(n, -1)


def storage_bytes(out_features: int, in_features: int, spec: QuantSpec, scale_bytes: int = 4) -> int:
    """Bytes of one quantized `[out, in]` weight, codes and scales (no kernel-specific padding)."""
    codes = out_features * in_features * spec.bits // 8
    return codes + out_features * spec.num_groups(in_features) * scale_bytes


# Checkpoint tensors `--quantization` stores quantized (HuggingFace -PT names): attention projections, dense MLPs,
# routed and shared experts. Embeddings, norms, the router (`mlp.gate.weight`: it picks the experts, and a
# flipped choice costs far more than a rounded weight) and `e_score_correction_bias` stay full precision; the
# LM head is the backend's choice (`lm_head.weight`, or a copy of the tied embedding).
_QUANTIZED_SUFFIXES = tuple(f"{p}_proj.weight" for p in ("q", "k", "v", "o", "gate", "up", "down"))


def is_quantized_tensor(name: str) -> bool:
    """Whether checkpoint tensor `name` is one `--quantization` quantizes (the LM head aside)."""
    return name.startswith("model.layers.") and name.endswith(_QUANTIZED_SUFFIXES)


@torch.inference_mode()
def write_dequantized_checkpoint(source: str | Path, target: str | Path, spec: QuantSpec, lm_head: bool) -> Path:
    """Copy the checkpoint at `source` to `target` with every quantized tensor replaced by what the quantized
    model computes with (`dequantize(quantize(w))`, float32), and the LM head too when `lm_head` (a tied one is
    untied: the embedding stays exact, the head becomes its dequantized copy). Loaded by the float32 reference
    (transformers, or our own model), it gives what a weight-only quantized model must compute, up to
    summation order. Tokenizer and other files are copied as they are."""
    from safetensors.torch import load_file, save_file

    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    tied = config.get("tie_word_embeddings", True)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(source.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    for name, tensor in list(tensors.items()):
        if is_quantized_tensor(name) or (lm_head and name == "lm_head.weight"):
            tensors[name] = dequantize(*quantize(tensor, spec), spec)
    if lm_head and tied:
        tensors["lm_head.weight"] = dequantize(*quantize(tensors["model.embed_tokens.weight"], spec), spec)
        config["tie_word_embeddings"] = False
    for file in source.iterdir():
        if file.is_file() and not file.name.endswith(".safetensors") and file.name != "model.safetensors.index.json":
            shutil.copy2(file, target / file.name)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(target / "model.safetensors"))
    return target
