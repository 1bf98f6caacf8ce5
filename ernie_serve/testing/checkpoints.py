"""Tiny real-format ERNIE 4.5 checkpoints and the transformers reference, for tests and backend conformance.

The checkpoints are written by transformers' own `save_pretrained` (sharded, with the index file), so they
have exactly the layout of the published "-PT" repositories. transformers is needed here only: it is a test
dependency (`pip install 'ernie-serve[test]'`), never imported when serving.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ernie_serve.checkpoint import checkpoint_files
from ernie_serve.demo_tokenizer import build_demo_tokenizer

TOKENIZER_VOCAB = 512
_BASE: dict[str, Any] = dict(
    vocab_size=TOKENIZER_VOCAB + 64,  # padded beyond the tokenizer, as real checkpoints are
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# The shapes the foundation issue names, each chosen to exercise a different corner of the math.
TINY_SHAPES: dict[str, dict[str, Any]] = {
    # MoE with shared experts and tied embeddings (like 21B-A3B)
    "moe_shared_tied": dict(
        model_type="ernie4_5_moe",
        num_hidden_layers=3,
        tie_word_embeddings=True,
        moe_intermediate_size=32,
        moe_k=2,
        moe_num_experts=6,
        moe_num_shared_experts=2,
        moe_layer_start_index=1,
        moe_layer_end_index=-1,
        moe_layer_interval=1,
    ),
    # every second layer MoE up to the last (-1), no shared experts, untied head, one KV head (like 300B)
    "moe_interval2_untied_mqa": dict(
        model_type="ernie4_5_moe",
        num_hidden_layers=4,
        tie_word_embeddings=False,
        num_key_value_heads=1,
        moe_intermediate_size=32,
        moe_k=3,
        moe_num_experts=5,
        moe_num_shared_experts=0,
        moe_layer_start_index=0,
        moe_layer_end_index=-1,
        moe_layer_interval=2,
    ),
    # top-1 routing and a dense tail layer after the MoE range
    "moe_top1_dense_tail": dict(
        model_type="ernie4_5_moe",
        num_hidden_layers=3,
        tie_word_embeddings=True,
        moe_intermediate_size=48,
        moe_k=1,
        moe_num_experts=4,
        moe_num_shared_experts=1,
        moe_layer_start_index=0,
        moe_layer_end_index=1,
        moe_layer_interval=1,
    ),
    # dense 0.3B-style with head_dim != hidden / heads and biases everywhere
    "dense_bias_headdim": dict(
        model_type="ernie4_5",
        num_hidden_layers=2,
        tie_word_embeddings=True,
        head_dim=24,
        use_bias=True,
    ),
}


def _transformers():
    try:
        import transformers
    except ImportError as missing:
        raise ImportError(
            "building reference checkpoints needs transformers: pip install 'ernie-serve[test]'"
        ) from missing
    return transformers


def hf_model_class(model_type: str):
    """transformers' (config class, model class) of an ERNIE 4.5 `model_type` (the reference implementation)."""
    transformers = _transformers()
    if model_type == "ernie4_5_moe":
        return transformers.Ernie4_5_MoeConfig, transformers.Ernie4_5_MoeForCausalLM
    return transformers.Ernie4_5Config, transformers.Ernie4_5ForCausalLM


@torch.no_grad()
def build_tiny_checkpoint(
    out_dir: str | Path,
    shape: str = "moe_shared_tied",
    disk_dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    max_shard_size: str = "150KB",
) -> Path:
    """Write a random tiny checkpoint of `shape` (a TINY_SHAPES key) with transformers, plus a tokenizer.

    Weights are drawn wider than transformers' default init so logits are far from ties (greedy parity is
    then a sharp test), and the MoE correction bias is non-zero so selection-only bias is exercised.
    """
    out_dir = Path(out_dir)
    options = {**_BASE, **TINY_SHAPES[shape]}
    model_type = options.pop("model_type")
    config_cls, model_cls = hf_model_class(model_type)
    config = config_cls(**options)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
        elif "e_score_correction_bias" in name:
            param.copy_(0.05 * torch.randn(param.shape, generator=generator))
        else:
            param.copy_(0.15 * torch.randn(param.shape, generator=generator))
    for name, buffer in model.named_buffers():
        if "e_score_correction_bias" in name:
            buffer.copy_(0.05 * torch.randn(buffer.shape, generator=generator))
    model.to(disk_dtype).save_pretrained(out_dir, max_shard_size=max_shard_size)
    build_demo_tokenizer(out_dir, vocab_size=TOKENIZER_VOCAB)
    return out_dir


# What the -Paddle repos' config.json carries beyond the -PT one: switches of Paddle's own kernels, unused here.
PADDLE_CONFIG_KEYS: dict[str, Any] = dict(
    use_rmsnorm=True,
    fuse_attn_ffn=True,
    fuse_linear=True,
    fuse_rms_norm=True,
    fuse_rope=True,
    fuse_swiglu=True,
)


@torch.no_grad()
def convert_to_paddle(
    source: str | Path, out_dir: str | Path, raw_uint16_every: int = 2, max_shard_bytes: int = 150_000
) -> Path:
    """Rewrite the -PT checkpoint directory `source` in the -Paddle layout (REFERENCE "Checkpoint layout") into
    `out_dir`, for tests and docs: no -Paddle repository can be downloaded where the tests run.

    `ernie.` prefix; linear weights (LM head and router included, not the embedding) stored `[in, out]`; q/k/v
    fused into `qkv_proj` and gate/up into `up_gate_proj` (gate first), biases alike; router and correction
    bias in float32; every `raw_uint16_every`-th bf16 tensor (in name order; 0 for none) stored as its raw
    uint16 bits; sharded at `max_shard_bytes` with an index; a config.json with `dtype` and Paddle-only keys.
    The tokenizer and generation_config.json are copied. Reads the whole (tiny) checkpoint into memory.
    """
    source, out_dir = Path(source), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    pt: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(source):
        pt.update(load_file(file))
    paddle: dict[str, torch.Tensor] = {}
    for name in sorted(pt):
        if name not in pt:
            continue  # consumed by an earlier fused tensor
        base, _, kind = name.rpartition(".")
        stem, _, proj = base.rpartition(".")
        if proj in ("q_proj", "k_proj", "v_proj"):
            parts = [pt.pop(f"{stem}.{p}.{kind}") for p in ("q_proj", "k_proj", "v_proj")]
            fused, out_name = torch.cat(parts), f"{stem}.qkv_proj.{kind}"  # [q + 2kv, H] or [q + 2kv]
        elif proj in ("gate_proj", "up_proj"):
            parts = [pt.pop(f"{stem}.{p}.{kind}") for p in ("gate_proj", "up_proj")]
            fused, out_name = torch.cat(parts), f"{stem}.up_gate_proj.{kind}"  # [2I, H] or [2I]
        else:
            fused, out_name = pt.pop(name), name
        if fused.dim() == 2 and kind == "weight" and not out_name.endswith("embed_tokens.weight"):
            fused = fused.t().contiguous()  # [out, in] -> [in, out]
        if out_name.endswith((".mlp.gate.weight", "e_score_correction_bias")):
            fused = fused.float()
        paddle["ernie." + out_name.removeprefix("model.") if out_name.startswith("model.") else out_name] = fused
    bf16 = [name for name in sorted(paddle) if paddle[name].dtype == torch.bfloat16]
    for name in bf16[::raw_uint16_every] if raw_uint16_every else []:
        paddle[name] = paddle[name].view(torch.uint16)

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(paddle):
        nbytes = paddle[name].numel() * paddle[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = paddle[name]
        size += nbytes
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / file))
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in paddle.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    rope = config.pop("rope_parameters", None) or config.pop("rope_scaling", None) or {}
    config.setdefault("rope_theta", rope.get("rope_theta", 500000.0))
    config["dtype"] = config.pop("torch_dtype", None) or config.get("dtype", "bfloat16")
    config.pop("transformers_version", None)
    (out_dir / "config.json").write_text(json.dumps(config | PADDLE_CONFIG_KEYS, indent=2))
    for file in source.iterdir():
        if file.is_file() and file.name != "config.json" and not file.name.startswith("model"):
            shutil.copy2(file, out_dir / file.name)
    return out_dir


def load_reference(checkpoint: str | Path):
    """transformers' own model for the checkpoint, float32 on CPU: the executable truth for the math."""
    transformers = _transformers()
    return transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()


@torch.no_grad()
def reference_greedy(model, prompt_token_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of one prompt, never stopping at eos (argmax of the full forward at
    every step, so no generation-config logic such as eos masking is involved)."""
    ids = list(prompt_token_ids)
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt_token_ids) :]


@torch.no_grad()
def reference_logprob_rows(model, prompt_token_ids: list[int], output_token_ids: list[int]) -> torch.Tensor:
    """log-softmax of transformers' logits at each generated position, teacher-forced on `output_token_ids`:
    `[len(output_token_ids), V]`, row i the distribution that output token i was drawn from."""
    ids = torch.tensor([prompt_token_ids + output_token_ids])
    logits = model(ids).logits[0].float()  # [L, V]
    start = len(prompt_token_ids) - 1
    return torch.log_softmax(logits, dim=-1)[start : start + len(output_token_ids)]  # [T, V]


def reference_logprobs(model, prompt_token_ids: list[int], output_token_ids: list[int]) -> list[float]:
    """transformers' logprob of each generated token, at its position."""
    rows = reference_logprob_rows(model, prompt_token_ids, output_token_ids)  # [T, V]
    return [float(rows[i, t]) for i, t in enumerate(output_token_ids)]
