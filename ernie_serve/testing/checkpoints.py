"""Tiny real-format ERNIE 4.5 checkpoints and the transformers reference, for tests and backend conformance.

The checkpoints are written by transformers' own `save_pretrained` (sharded, with the index file), so they
have exactly the layout of the published "-PT" repositories. transformers is needed here only: it is a test
dependency (`pip install 'ernie-serve[test]'`), never imported when serving.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

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


def _hf_model_class(model_type: str):
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
    config_cls, model_cls = _hf_model_class(model_type)
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
