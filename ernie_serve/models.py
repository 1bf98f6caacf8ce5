"""What `--model` names: a checkpoint directory, a preset shape (with `--load-format dummy`) or "demo".

Resolving a name finds the config, weights and tokenizer; nothing here loads weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ernie_serve.core.config import EngineSettings, ModelConfig
from ernie_serve.demo import demo_checkpoint_dir

_COMMON = dict(
    vocab_size=103424,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    head_dim=128,
)

PRESETS: dict[str, ModelConfig] = {
    "ernie-4.5-0.3b": ModelConfig(
        model_type="ernie4_5",
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=18,
        num_attention_heads=16,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        **_COMMON,
    ),
    "ernie-4.5-21b-a3b": ModelConfig(
        model_type="ernie4_5_moe",
        hidden_size=2560,
        intermediate_size=12288,
        num_hidden_layers=28,
        num_attention_heads=20,
        num_key_value_heads=4,
        tie_word_embeddings=True,
        moe_intermediate_size=1536,
        moe_k=6,
        moe_num_experts=64,
        moe_num_shared_experts=2,
        moe_layer_start_index=1,
        moe_layer_end_index=27,
        moe_layer_interval=1,
        **_COMMON,
    ),
    "ernie-4.5-300b-a47b": ModelConfig(
        model_type="ernie4_5_moe",
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=54,
        num_attention_heads=64,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        moe_intermediate_size=3584,
        moe_k=8,
        moe_num_experts=64,
        moe_num_shared_experts=0,
        moe_layer_start_index=3,
        moe_layer_end_index=53,
        moe_layer_interval=1,
        **_COMMON,
    ),
}


@dataclass
class ResolvedModel:
    """Where weights, config and tokenizer come from for a `--model` value."""

    config: ModelConfig
    weights_path: str | None  # None: dummy weights
    tokenizer_path: str
    generation_defaults: dict[str, float]  # temperature / top_p from generation_config.json


def resolve_model(settings: EngineSettings) -> ResolvedModel:
    """`--model` is a checkpoint directory, a preset name (dummy weights only) or "demo"."""
    name = settings.model
    if name == "demo":
        path = demo_checkpoint_dir()
    elif name in PRESETS:
        if settings.load_format != "dummy":
            raise ValueError(f"--model {name} is a preset shape without weights: add --load-format dummy")
        return ResolvedModel(PRESETS[name], None, settings.tokenizer or str(demo_checkpoint_dir()), {})
    else:
        path = Path(name)
        if not path.is_dir():
            raise ValueError(
                f"--model {name!r} is neither a checkpoint directory, 'demo', nor a preset "
                f"({', '.join(PRESETS)}); downloads are not supported, pass a local path"
            )
    config = ModelConfig.from_pretrained(path)
    defaults: dict[str, float] = {}
    generation_config = path / "generation_config.json"
    if generation_config.is_file():
        raw = json.loads(generation_config.read_text())
        defaults = {k: float(raw[k]) for k in ("temperature", "top_p") if raw.get(k) is not None}
    weights = None if settings.load_format == "dummy" else str(path)
    return ResolvedModel(config, weights, settings.tokenizer or str(path), defaults)
