"""Checkpoint formats: layout detection, and -Paddle tensors streamed in -PT naming and orientation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ernie_serve.checkpoint import CheckpointError, detect_layout, disk_name, iter_checkpoint
from ernie_serve.models import read_model_config
from ernie_serve.testing.checkpoints import TINY_SHAPES


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    config = read_model_config(path)
    return {item.name: item.tensor.float() for item in iter_checkpoint(path, config)}


def test_layout_is_detected_from_tensor_names(tiny_checkpoint, paddle_checkpoint, tmp_path: Path) -> None:
    assert detect_layout(tiny_checkpoint("moe_shared_tied", torch.bfloat16)) == "pt"
    assert detect_layout(paddle_checkpoint("moe_shared_tied")) == "paddle"
    # without an index the names come from the file's header
    save_file(
        {"lm_head.weight": torch.ones(2, 2), "ernie.norm.weight": torch.ones(2)}, str(tmp_path / "model.safetensors")
    )
    assert detect_layout(tmp_path) == "paddle"
    save_file(
        {"model.norm.weight": torch.ones(2), "ernie.norm.weight": torch.ones(2)}, str(tmp_path / "model.safetensors")
    )
    with pytest.raises(CheckpointError, match="both 'model.' and 'ernie.' prefixes"):
        detect_layout(tmp_path)
    save_file({"transformer.h.0.weight": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=re.escape("neither 'model.' (-PT) nor 'ernie.' (-Paddle)")):
        detect_layout(tmp_path)


@pytest.mark.parametrize("shape", list(TINY_SHAPES))
def test_paddle_tensors_equal_the_pt_originals(tiny_checkpoint, paddle_checkpoint, shape: str) -> None:
    ours = _tensors(paddle_checkpoint(shape))
    expected = _tensors(tiny_checkpoint(shape, torch.bfloat16))
    assert ours.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor), name


def test_fused_parts_are_views_of_one_read_and_uint16_is_bfloat16(paddle_checkpoint) -> None:
    path = paddle_checkpoint("dense_bias_headdim")
    items = {item.name: item for item in iter_checkpoint(path, read_model_config(path))}
    parts = [items[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]
    assert {item.source for item in parts} == {"ernie.layers.0.self_attn.qkv_proj.weight"}
    # one tensor read, three views: the loader copies each into place, no part is copied on its own
    assert len({item.tensor.untyped_storage().data_ptr() for item in parts}) == 1
    assert [tuple(item.tensor.shape) for item in parts] == [(96, 64), (48, 64), (48, 64)]  # [out, in]
    assert not parts[0].tensor.is_contiguous()  # transposed as a view, made contiguous by the copy into place

    raw = set()
    for file in sorted(path.glob("model-*.safetensors")):
        with safe_open(str(file), framework="pt") as reader:
            raw |= {name for name in reader.keys() if reader.get_slice(name).get_dtype() == "U16"}
    from_raw = [item for item in items.values() if item.source in raw]
    assert from_raw and {item.tensor.dtype for item in from_raw} == {torch.bfloat16}


def test_paddle_mtp_and_tied_head_are_skipped(paddle_checkpoint, tmp_path: Path) -> None:
    source = paddle_checkpoint("moe_shared_tied")
    config = read_model_config(source)
    extra = {
        "ernie.mtp_block.0.input_layernorm.weight": torch.ones(64),
        "ernie.mtp_linear_proj.0.weight": torch.ones(128, 64),
        "lm_head.weight": torch.ones(64, 576),  # a tied checkpoint may still carry a head: the embedding wins
    }
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "config.json").write_text((source / "config.json").read_text())
    save_file(extra | {"ernie.norm.weight": torch.ones(64)}, str(out / "model.safetensors"))
    assert [item.name for item in iter_checkpoint(out, config)] == ["model.norm.weight"]


def test_disk_names_of_pt_names() -> None:
    assert disk_name("model.layers.3.self_attn.k_proj.bias", "paddle") == "ernie.layers.3.self_attn.qkv_proj.bias"
    assert disk_name("model.layers.3.mlp.experts.7.up_proj.weight", "paddle") == (
        "ernie.layers.3.mlp.experts.7.up_gate_proj.weight"
    )
    assert disk_name("model.layers.3.mlp.gate.weight", "paddle") == "ernie.layers.3.mlp.gate.weight"
    assert disk_name("model.layers.3.mlp.shared_experts.down_proj.weight", "paddle") == (
        "ernie.layers.3.mlp.shared_experts.down_proj.weight"
    )
    assert disk_name("lm_head.weight", "paddle") == "lm_head.weight"
    assert disk_name("model.layers.3.self_attn.k_proj.bias", "pt") == "model.layers.3.self_attn.k_proj.bias"
