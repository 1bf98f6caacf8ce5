"""The -Paddle converter writes what the -Paddle tests claim to cover (REFERENCE "Checkpoint layout")."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from ernie_serve.models import read_model_config
from ernie_serve.testing.checkpoints import PADDLE_CONFIG_KEYS


def _headers(path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype) over every shard the index names."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    found = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(path / file), framework="pt") as reader:
            for name in reader.keys():
                assert index["weight_map"][name] == file
                found[name] = (tuple(reader.get_slice(name).get_shape()), reader.get_slice(name).get_dtype())
    assert found.keys() == index["weight_map"].keys()
    return found


def test_untied_moe_checkpoint_in_paddle_layout(paddle_checkpoint, tiny_checkpoint) -> None:
    path = paddle_checkpoint("moe_interval2_untied_mqa")
    headers = _headers(path)
    assert len(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    assert all(name.startswith("ernie.") or name == "lm_head.weight" for name in headers)
    assert headers["lm_head.weight"][0] == (64, 576)  # [H, V]
    assert headers["ernie.embed_tokens.weight"][0] == (576, 64)  # [V, H], as in -PT
    assert headers["ernie.layers.1.self_attn.qkv_proj.weight"][0] == (64, 64 + 16 + 16)  # [H, q | k | v], 1 KV head
    assert headers["ernie.layers.1.self_attn.o_proj.weight"][0] == (64, 64)
    assert headers["ernie.layers.1.mlp.gate.weight"] == ((64, 5), "F32")  # router [H, E], float32
    assert headers["ernie.layers.1.mlp.moe_statics.e_score_correction_bias"] == ((1, 5), "F32")
    assert headers["ernie.layers.1.mlp.experts.4.up_gate_proj.weight"][0] == (64, 64)  # [H, gate | up]
    assert headers["ernie.layers.1.mlp.experts.4.down_proj.weight"][0] == (32, 64)  # [I, H]
    assert headers["ernie.layers.0.mlp.up_gate_proj.weight"][0] == (64, 192)  # a dense layer
    unfused = (".q_proj", ".k_proj", ".v_proj", ".gate_proj", ".up_proj")
    assert not [name for name in headers if any(part in name for part in unfused)]
    assert {dtype for _, dtype in headers.values()} == {"BF16", "U16", "F32"}

    config = json.loads((path / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "torch_dtype" not in config
    assert PADDLE_CONFIG_KEYS.items() <= config.items()
    parsed = read_model_config(path)
    assert parsed == read_model_config(tiny_checkpoint("moe_interval2_untied_mqa", torch.bfloat16))
    assert parsed.extra["fuse_rope"] is True and parsed.dtype == "bfloat16"


def test_shared_experts_and_biases_are_fused(paddle_checkpoint) -> None:
    shared = _headers(paddle_checkpoint("moe_shared_tied"))
    assert "lm_head.weight" not in shared
    assert shared["ernie.layers.1.mlp.shared_experts.up_gate_proj.weight"][0] == (64, 2 * 2 * 32)  # 2 shared
    biased = _headers(paddle_checkpoint("dense_bias_headdim"))
    assert biased["ernie.layers.0.self_attn.qkv_proj.bias"][0] == (4 * 24 + 2 * 2 * 24,)
    assert biased["ernie.layers.0.mlp.up_gate_proj.bias"][0] == (2 * 96,)
