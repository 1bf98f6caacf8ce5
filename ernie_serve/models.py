"""What `--model` names: a checkpoint directory, a preset shape (with `--load-format dummy`) or "demo".

Resolving a name finds the config, weights and tokenizer; nothing here loads weights. A preset has no files at
all: its tokenizer (unless `--tokenizer`) is the demo tokenizer padded to the preset's vocabulary, in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ernie_serve.core.config import EngineSettings, ModelConfig
from ernie_serve.core.errors import UserError
from ernie_serve.demo import demo_checkpoint_dir
from ernie_serve.demo_tokenizer import padded_demo_tokenizer
from ernie_serve.tokenizer import Tokenizer

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


class ModelResolutionError(UserError, ValueError):
    """A `--model` or `--tokenizer` value that cannot be served; the message names the flag and what to do."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where weights, config and tokenizer come from for a `--model` value; `resolve_model` builds it, the
    engine reads `config` and `weights_path` and calls `load_tokenizer` once at start."""

    config: ModelConfig
    weights_path: str | None  # None: dummy weights
    tokenizer_path: str | None  # a tokenizer directory; None: a preset's demo tokenizer, built in memory
    generation_defaults: dict[str, float]  # temperature / top_p from generation_config.json
    tokenizer_from_flag: bool = False  # tokenizer_path came from --tokenizer (named in errors)

    def load_tokenizer(self, chat_template: str | None = None) -> Tokenizer:
        """The model's tokenizer (`chat_template`: --chat-template, overriding the tokenizer's own).

        A preset without `--tokenizer` gets the demo tokenizer padded with placeholder tokens to the preset's
        vocabulary, so every id the model can produce decodes; nothing is written to disk. A `--tokenizer`
        whose ids would run past the model's embedding is refused.
        """
        if self.tokenizer_path is None:
            return padded_demo_tokenizer(self.config.vocab_size, chat_template=chat_template)
        tokenizer = Tokenizer.from_pretrained(self.tokenizer_path, chat_template=chat_template)
        # Only a tokenizer the user paired with the model is checked: a checkpoint's own pairing is its
        # authors' choice (some declare added tokens that are never generated).
        if self.tokenizer_from_flag and tokenizer.vocab_size > self.config.vocab_size:
            raise ModelResolutionError(
                f"--tokenizer {self.tokenizer_path} has {tokenizer.vocab_size:,} token ids, more than the "
                f"model's vocabulary of {self.config.vocab_size:,}: its prompts could hold ids the model has no "
                "embedding for; pass the tokenizer the model was trained with"
            )
        return tokenizer


def resolve_model(settings: EngineSettings) -> ResolvedModel:
    """`--model` is a checkpoint directory, a preset name (dummy weights only) or "demo"; `--tokenizer`, when
    given, replaces the model's tokenizer. Called once when an engine (or `export onnx`) starts.

    Loads no weights and writes nothing, except that "demo" builds the demo checkpoint into the cache on first
    use. Raises `ModelResolutionError` for a name that is none of the three.
    """
    name = settings.model
    flag = settings.tokenizer is not None
    if settings.tokenizer is not None and not Path(settings.tokenizer).is_dir():
        raise ModelResolutionError(f"--tokenizer {settings.tokenizer!r} is not a directory")
    if name == "demo":
        path = demo_checkpoint_dir()
    elif name in PRESETS:
        if settings.load_format != "dummy":
            raise ModelResolutionError(f"--model {name} is a preset shape without weights: add --load-format dummy")
        return ResolvedModel(PRESETS[name], None, settings.tokenizer, {}, tokenizer_from_flag=flag)
    else:
        path = Path(name)
        if not path.is_dir():
            raise ModelResolutionError(
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
    return ResolvedModel(config, weights, settings.tokenizer or str(path), defaults, tokenizer_from_flag=flag)
