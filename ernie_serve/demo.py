"""The built-in demo model: a small ERNIE-4.5-MoE-shaped checkpoint with a real (byte-level BPE) tokenizer,
built deterministically on first use into a cache directory. Its weights are random: it exercises every code
path of a real checkpoint, but its text is gibberish.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ernie_serve.core.config import ModelConfig
from ernie_serve.demo_tokenizer import DEMO_VOCAB_SIZE, build_demo_tokenizer
from ernie_serve.logging import progress

# stdlib, not structlog: callers that never configured logging (scripts calling demo_checkpoint_dir) must
# not get an event printed into their stdout.
log = logging.getLogger(__name__)

DEMO_VERSION = "2"  # 2: ERNIE's reasoning and tool-call tags in the tokenizer, a template with tools
DEMO_CONFIG = ModelConfig(
    model_type="ernie4_5_moe",
    vocab_size=2112,  # a padded embedding, larger than the tokenizer, as in real checkpoints
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=4096,
    moe_intermediate_size=192,
    moe_k=2,
    moe_num_experts=8,
    moe_num_shared_experts=1,
    moe_layer_start_index=1,
    moe_layer_end_index=-1,
    moe_layer_interval=1,
    tie_word_embeddings=True,
    dtype="bfloat16",
)


def cache_root() -> Path:
    """Where built artifacts (the demo model, ONNX exports, benchmark models) live: $ERNIE_SERVE_CACHE, else
    ~/.cache/ernie-serve."""
    return Path(os.environ.get("ERNIE_SERVE_CACHE", Path.home() / ".cache" / "ernie-serve"))


def demo_checkpoint_dir() -> Path:
    """The demo checkpoint directory, built on first call (atomically, so concurrent starts are safe)."""
    target = cache_root() / f"demo-v{DEMO_VERSION}"
    if (target / "config.json").is_file():
        return target
    log.info("building the demo model (once) in %s", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="demo-", dir=target.parent))
    try:
        write_random_checkpoint(staging, DEMO_CONFIG, seed=0, description="building the demo model")
        build_demo_tokenizer(staging, vocab_size=DEMO_VOCAB_SIZE)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def write_random_checkpoint(
    out_dir: Path,
    config: ModelConfig,
    seed: int,
    dtype: torch.dtype = torch.bfloat16,
    std: float = 0.05,
    description: str = "writing random weights",
) -> None:
    """A HuggingFace-layout checkpoint (config.json, generation_config.json, model.safetensors) with seeded
    random weights, named exactly like transformers' `save_pretrained` output. `description` labels the
    progress bar shown meanwhile (one step per tensor)."""
    from ernie_serve.backends.torch.model import ErnieForCausalLM

    generator = torch.Generator().manual_seed(seed)
    skeleton = ErnieForCausalLM(config, torch.float32, torch.device("meta"))
    targets = list(skeleton.checkpoint_targets())  # meta tensors: listing them costs nothing
    tensors: dict[str, torch.Tensor] = {}
    for name, target in progress(targets, description, total=len(targets), unit="tensor"):
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * torch.randn(target.shape, generator=generator)
        elif name.endswith("e_score_correction_bias"):
            value = 0.01 * torch.randn(target.shape, generator=generator)
        else:
            value = std * torch.randn(target.shape, generator=generator)
        keep_fp32 = name.endswith(("e_score_correction_bias", "mlp.gate.weight"))
        tensors[name] = value.to(torch.float32 if keep_fp32 else dtype).contiguous()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config_dict(config), indent=2))
    generation = {"temperature": 0.8, "top_p": 0.8, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))


def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    """config.json contents for `config`'s shape, in HuggingFace's layout (the demo and dummy checkpoints)."""
    raw = {k: v for k, v in asdict(config).items() if k not in ("extra", "eos_token_ids", "dtype")}
    eos = config.eos_token_ids
    raw["eos_token_id"] = list(eos) if len(eos) > 1 else eos[0]
    raw["architectures"] = [config.architecture]
    raw["dtype"] = config.dtype
    return raw
