"""The backend-neutral quantization math: error bounds, grouping, packing, and the dequantized checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ernie_serve.quantization import (
    QuantSpec,
    dequantize,
    is_quantized_tensor,
    pack_int4,
    quantize,
    storage_bytes,
    unpack_int4,
    write_dequantized_checkpoint,
)

SPECS = [QuantSpec("wint8"), QuantSpec("wint4"), QuantSpec("wint4", 64), QuantSpec("wint4", 128)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("in_features", [256, 200])  # 200: the last group of 64 / 128 is short
def test_round_trip_error_is_at_most_half_a_step(spec: QuantSpec, in_features: int) -> None:
    weight = torch.randn(3, 48, in_features, generator=torch.Generator().manual_seed(0))  # [E, out, in]
    codes, scales = quantize(weight, spec)
    assert codes.dtype == torch.int8 and codes.shape == weight.shape
    assert scales.shape == (3, 48, spec.num_groups(in_features))
    assert int(codes.abs().max()) == spec.qmax  # each group's largest weight maps to the largest code
    restored = dequantize(codes, scales, spec)
    # each element's step is its group's scale: round-to-nearest is off by at most half of it
    size = spec.group_size or in_features
    steps = scales.repeat_interleave(size, dim=-1)[..., :in_features]
    assert torch.all((restored - weight).abs() <= steps / 2 + 1e-6)


def test_int8_ignores_the_group_size_and_an_all_zero_group_stays_zero() -> None:
    assert QuantSpec.of("wint8", 128) == QuantSpec("wint8", 0)
    assert QuantSpec.of("wint4", -1) == QuantSpec("wint4", 0) and QuantSpec.of("wint4", 64).group_size == 64
    weight = torch.zeros(2, 128)
    weight[1, 64:] = torch.linspace(-1, 1, 64)
    codes, scales = quantize(weight, QuantSpec("wint4", 64))
    assert torch.equal(dequantize(codes, scales, QuantSpec("wint4", 64))[0], torch.zeros(128))
    assert torch.all(torch.isfinite(scales))


def test_smaller_groups_are_more_accurate_on_rows_with_outliers() -> None:
    weight = torch.randn(64, 512, generator=torch.Generator().manual_seed(1))
    weight[:, 7] *= 20  # one outlier input channel stretches its group's (or its row's) scale
    errors = {}
    for group in (0, 128, 64):
        spec = QuantSpec("wint4", group)
        errors[group] = float((dequantize(*quantize(weight, spec), spec) - weight).pow(2).mean())
    assert errors[64] < errors[128] < errors[0]


def test_int4_packing_round_trips_low_nibble_first() -> None:
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(3).view(3, 16)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 8)
    assert int(packed[0, 0]) == 0x10  # codes -8 (0 offset) low, -7 (1) high
    assert torch.equal(unpack_int4(packed), codes)
    with pytest.raises(ValueError, match="even"):
        pack_int4(codes[:, :3])


def test_storage_bytes_counts_codes_and_scales() -> None:
    assert storage_bytes(256, 512, QuantSpec("wint8")) == 256 * 512 + 256 * 4
    assert storage_bytes(256, 512, QuantSpec("wint4", 128)) == 256 * 256 + 256 * 4 * 4
    # the targets: at most 0.26x (wint8) and 0.14x (wint4, group 128) of float32
    assert storage_bytes(1536, 2560, QuantSpec("wint8")) / (1536 * 2560 * 4) <= 0.26
    assert storage_bytes(1536, 2560, QuantSpec("wint4", 128)) / (1536 * 2560 * 4) <= 0.14


def test_which_checkpoint_tensors_are_quantized() -> None:
    assert is_quantized_tensor("model.layers.3.self_attn.q_proj.weight")
    assert is_quantized_tensor("model.layers.3.mlp.experts.7.down_proj.weight")
    assert is_quantized_tensor("model.layers.3.mlp.shared_experts.gate_proj.weight")
    assert is_quantized_tensor("model.layers.0.mlp.up_proj.weight")
    for kept in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.3.mlp.gate.weight",  # the router
        "model.layers.3.mlp.moe_statics.e_score_correction_bias",
        "model.layers.3.input_layernorm.weight",
        "model.layers.3.self_attn.q_proj.bias",
    ):
        assert not is_quantized_tensor(kept), kept


def test_dequantized_checkpoint_unties_a_quantized_head(tiny_checkpoint, tmp_path: Path) -> None:
    source = tiny_checkpoint("moe_shared_tied", torch.bfloat16)
    spec = QuantSpec("wint4", 64)
    out = write_dequantized_checkpoint(source, tmp_path / "deq", spec, lm_head=True)
    tensors = load_file(out / "model.safetensors")
    original: dict[str, torch.Tensor] = {}
    for file in source.glob("*.safetensors"):
        original.update(load_file(file))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    assert torch.equal(tensors[name], dequantize(*quantize(original[name], spec), spec))
    assert torch.equal(tensors["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    embed = original["model.embed_tokens.weight"]
    assert torch.equal(tensors["lm_head.weight"], dequantize(*quantize(embed, spec), spec))
    assert (out / "tokenizer.json").is_file()
