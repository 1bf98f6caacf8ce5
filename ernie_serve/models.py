"""What `--model` names: a checkpoint directory, a HuggingFace model id (`baidu/ERNIE-4.5-21B-A3B-PT`), a preset
shape (with `--load-format dummy`) or "demo".

Resolving a name finds the config, weights and tokenizer; nothing here loads weights. A model id is downloaded
into the HuggingFace cache (or found there) by huggingface_hub, which reads `HF_HOME`, `HF_HUB_OFFLINE` and
`HF_TOKEN` itself. A preset has no files at all: its tokenizer (unless `--tokenizer`) is the demo tokenizer
padded to the preset's vocabulary, in memory.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from ernie_serve.checkpoint import INDEX_FILE
from ernie_serve.core.config import SUPPORTED_MODEL_TYPES, EngineSettings, ModelConfig, ModelConfigError
from ernie_serve.core.errors import UserError
from ernie_serve.demo import demo_checkpoint_dir
from ernie_serve.demo_tokenizer import padded_demo_tokenizer
from ernie_serve.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# What serving reads from a model repository; the rest (other weight formats, MTP-only files, docs) is skipped.
CONFIG_FILES = ["config.json", "generation_config.json"]
WEIGHT_FILES = ["*.safetensors", INDEX_FILE]
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
]

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
    """`--model` is a checkpoint directory, a HuggingFace model id (`owner/name`, at `--revision`), a preset name
    (dummy weights only) or "demo"; a local directory wins over a model id of the same name. `--tokenizer`,
    when given, replaces the model's tokenizer. Called once when an engine (or `export onnx`) starts.

    Loads no weights. Writes nothing, except that "demo" builds the demo checkpoint into the cache on first use
    and a model id downloads what serving reads into the HuggingFace cache. Raises `ModelResolutionError` for a
    name that is none of these, or a model id that cannot be fetched.
    """
    name = settings.model
    flag = settings.tokenizer is not None
    if settings.tokenizer is not None and not Path(settings.tokenizer).is_dir():
        raise ModelResolutionError(f"--tokenizer {settings.tokenizer!r} is not a directory")
    local = name == "demo" or name in PRESETS or Path(name).is_dir()
    if settings.revision is not None and local:
        log.warning("--revision %s has no effect: --model %s is not a HuggingFace model id", settings.revision, name)
    if name == "demo":
        path = demo_checkpoint_dir()
    elif name in PRESETS:
        if settings.load_format != "dummy":
            raise ModelResolutionError(f"--model {name} is a preset shape without weights: add --load-format dummy")
        return ResolvedModel(PRESETS[name], None, settings.tokenizer, {}, tokenizer_from_flag=flag)
    elif Path(name).is_dir():
        path = Path(name)
    elif is_model_id(name):
        path = download_model(settings)
    else:
        raise ModelResolutionError(
            f"--model {name!r} is neither a checkpoint directory, a HuggingFace model id (owner/name), 'demo', "
            f"nor a preset ({', '.join(PRESETS)})"
        )
    config = read_model_config(path)
    defaults: dict[str, float] = {}
    generation_config = path / "generation_config.json"
    if generation_config.is_file():
        raw = json.loads(generation_config.read_text())
        defaults = {k: float(raw[k]) for k in ("temperature", "top_p") if raw.get(k) is not None}
    weights = None if settings.load_format == "dummy" else str(path)
    return ResolvedModel(config, weights, settings.tokenizer or str(path), defaults, tokenizer_from_flag=flag)


def is_model_id(name: str) -> bool:
    """Whether `name` has the form of a HuggingFace model id, `owner/name` (paths with more parts do not)."""
    if name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def download_model(settings: EngineSettings) -> Path:
    """The snapshot directory of the model id `settings.model` at `settings.revision` in the HuggingFace cache,
    downloading the files serving reads (no weights with `--load-format dummy`, no tokenizer with `--tokenizer`)
    unless they are cached. Called by `resolve_model` for a `--model` that is no local directory.

    Every failure is one `ModelResolutionError` line naming `--model` and what to do.
    """
    name, revision = settings.model, settings.revision
    at = f" at --revision {revision}" if revision else ""
    patterns = list(CONFIG_FILES)
    if settings.load_format != "dummy":
        patterns += WEIGHT_FILES
    if settings.tokenizer is None:
        patterns += TOKENIZER_FILES
    try:
        snapshot = snapshot_download(name, revision=revision, allow_patterns=patterns)
    except LocalEntryNotFoundError as exc:  # also when only part of the snapshot is cached
        cache = hub_constants.HF_HUB_CACHE
        if hub_constants.HF_HUB_OFFLINE:
            raise ModelResolutionError(
                f"--model {name}{at} is not (wholly) in the HuggingFace cache ({cache}) and HF_HUB_OFFLINE is "
                "set: download it once with network access, or pass a local checkpoint directory"
            ) from exc
        raise ModelResolutionError(
            f"--model {name}{at} could not be downloaded (the HuggingFace Hub cannot be reached) and is not "
            f"(wholly) in the cache ({cache}): check the network, or pass a local checkpoint directory"
        ) from exc
    except GatedRepoError as exc:
        raise ModelResolutionError(
            f"--model {name} is gated on the HuggingFace Hub: accept its terms on its page there and set HF_TOKEN"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelResolutionError(
            f"--model {name} is not a local directory and no model of that id is on the HuggingFace Hub (for a "
            "private one, set HF_TOKEN): check the spelling, e.g. baidu/ERNIE-4.5-21B-A3B-PT"
        ) from exc
    except RevisionNotFoundError as exc:
        raise ModelResolutionError(
            f"--revision {revision} is not a branch, tag or commit of --model {name}: check the revision"
        ) from exc
    except (HfHubHTTPError, OSError) as exc:  # server errors, a full disk, a cache without write permission
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelResolutionError(f"--model {name}{at} could not be downloaded: {first_line}") from exc
    return Path(snapshot)


def num_parameters(config: ModelConfig) -> int:
    """The parameter count of a model of `config`'s shape (the engine logs it; docs quote the presets')."""
    h, d = config.hidden_size, config.head_dim
    attn = h * d * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    total = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    for i in range(config.num_hidden_layers):
        if config.is_moe_layer(i):
            mlp = 3 * h * config.moe_intermediate_size * (config.moe_num_experts + config.moe_num_shared_experts)
            mlp += config.moe_num_experts * h
        else:
            mlp = 3 * h * config.intermediate_size
        total += attn + mlp + 2 * h
    return total + h


def model_config_from_dict(raw: dict[str, Any]) -> ModelConfig:
    """The `ModelConfig` of a config.json's contents (both ERNIE 4.5 model types; fields we do not use are kept in
    `extra`). Raises `ModelConfigError` naming what cannot be served."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelConfigError(
            f"unsupported model_type {model_type!r}: ernie-serve serves {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_theta = raw.get("rope_theta", rope.get("rope_theta", 500000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise ModelConfigError(f"unsupported rope_type {rope_type!r}: only the default RoPE is implemented")
    heads = raw["num_attention_heads"]
    eos = raw.get("eos_token_id", 2)
    known = {f for f in ModelConfig.__dataclass_fields__}
    try:
        config = ModelConfig(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            hidden_act=raw.get("hidden_act", "silu"),
            max_position_embeddings=raw.get("max_position_embeddings", 131072),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
            use_bias=bool(raw.get("use_bias", False)),
            tie_word_embeddings=raw.get("tie_word_embeddings", True),
            rope_theta=float(rope_theta),
            moe_intermediate_size=raw.get("moe_intermediate_size", 0) or 0,
            moe_k=raw.get("moe_k", 0) or 0,
            moe_num_experts=raw.get("moe_num_experts", 0) or 0,
            moe_num_shared_experts=raw.get("moe_num_shared_experts", 0) or 0,
            moe_layer_start_index=raw.get("moe_layer_start_index", 0) or 0,
            moe_layer_end_index=raw.get("moe_layer_end_index", -1),
            moe_layer_interval=raw.get("moe_layer_interval", 1) or 1,
            moe_norm_min=raw.get("moe_norm_min", 1e-12),
            pad_token_id=raw.get("pad_token_id", 0) or 0,
            bos_token_id=raw.get("bos_token_id", 1),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,),
            dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"),
            extra={k: v for k, v in raw.items() if k not in known},
        )
    except KeyError as missing:
        raise ModelConfigError(f"config.json lacks the required field {missing.args[0]!r}") from None
    if config.hidden_act != "silu":
        raise ModelConfigError(f"unsupported hidden_act {config.hidden_act!r}: ERNIE 4.5 uses silu")
    if heads % config.num_key_value_heads:
        raise ModelConfigError(
            f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({config.num_key_value_heads})"
        )
    if config.is_moe and not 0 < config.moe_k <= config.moe_num_experts:
        raise ModelConfigError(f"moe_k ({config.moe_k}) must be in 1..moe_num_experts")
    return config


def read_model_config(path: str | Path) -> ModelConfig:
    """The `ModelConfig` of the checkpoint directory `path` (its config.json); called when a model is resolved."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ModelConfigError(f"{path} has no config.json: not a HuggingFace-format checkpoint")
    return model_config_from_dict(json.loads(config_file.read_text()))
