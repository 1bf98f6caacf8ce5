"""Model configuration and engine settings.

`ModelConfig` is plain data (read from a checkpoint's config.json by `ernie_serve.models.read_model_config`, or a
named preset); `EngineSettings` is a pydantic-settings model, so every option can come from a
keyword argument, an `ERNIE_SERVE_*` environment variable or a CLI flag, validated in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from ernie_serve.core.errors import UserError

SUPPORTED_MODEL_TYPES = {
    "ernie4_5": "Ernie4_5ForCausalLM",
    "ernie4_5_moe": "Ernie4_5_MoeForCausalLM",
}


class ModelConfigError(UserError, ValueError):
    """A checkpoint's config.json that ernie-serve cannot serve."""


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of one ERNIE 4.5 checkpoint; every field of REFERENCE's config.json table."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    use_bias: bool = False
    tie_word_embeddings: bool = True
    rope_theta: float = 500000.0
    # MoE (ignored for model_type ernie4_5)
    moe_intermediate_size: int = 0
    moe_k: int = 0
    moe_num_experts: int = 0
    moe_num_shared_experts: int = 0
    moe_layer_start_index: int = 0
    moe_layer_end_index: int = -1  # -1: the last layer
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_ids: tuple[int, ...] = (2,)
    dtype: str = "bfloat16"  # on-disk dtype named by config.json
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # fields we accept but do not use

    @property
    def architecture(self) -> str:
        return SUPPORTED_MODEL_TYPES[self.model_type]

    @property
    def is_moe(self) -> bool:
        return self.model_type == "ernie4_5_moe" and self.moe_num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """REFERENCE: `(i + 1) % interval == 0 and start <= i <= end`, end -1 meaning the last layer."""
        if not self.is_moe:
            return False
        end = self.num_hidden_layers - 1 if self.moe_layer_end_index == -1 else self.moe_layer_end_index
        return (layer + 1) % self.moe_layer_interval == 0 and self.moe_layer_start_index <= layer <= end


class EngineSettings(BaseSettings):
    """Every engine option. Field names are FastDeploy/vLLM flag names with `_` for `-`."""

    model_config = SettingsConfigDict(env_prefix="ERNIE_SERVE_", extra="forbid", validate_assignment=True)

    model: str = Field("demo", description="checkpoint directory, HuggingFace model id, preset name, or 'demo'")
    revision: str | None = Field(None, description="branch, tag or commit of a HuggingFace model id (default: main)")
    tokenizer: str | None = Field(None, description="tokenizer directory (default: the model's)")
    backend: str = Field("torch", description="registered backend name")
    scheduler: str = Field("fcfs", description="registered scheduler name")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype; auto = float32 on CPU, the checkpoint's dtype on GPU"
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    load_format: Literal["auto", "safetensors", "dummy"] = Field(
        "auto", description="dummy = random weights of the model's shape"
    )
    seed: int = Field(0, description="seed for dummy weights and requests without a seed")
    max_model_len: int | None = Field(None, ge=1, description="context limit (default: the model's, capped)")
    max_num_seqs: int = Field(64, ge=1, description="most sequences running at once")
    max_num_batched_tokens: int = Field(2048, ge=1, description="most tokens computed in one step")
    block_size: int = Field(16, ge=1, description="tokens per KV cache block")
    num_gpu_blocks_override: int | None = Field(None, ge=1, description="KV pool size in blocks")
    kv_cache_memory_bytes: int | None = Field(None, ge=1, description="KV pool size in bytes")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="fraction of GPU memory to use")
    enable_chunked_prefill: bool = Field(True, description="split long prompts over several steps")
    enable_prefix_caching: bool = Field(True, description="share KV blocks of identical prefixes")
    quantization: Literal["wint8", "wint4"] | None = Field(None, description="weight-only quantization")
    quantization_group_size: Literal[-1, 64, 128] = Field(
        128, description="wint4: input channels sharing a scale; -1 = one scale per output channel"
    )
    tensor_parallel_size: int = Field(1, ge=1, description="tensor-parallel ranks")
    chat_template: str | None = Field(None, description="Jinja chat template file or string")
    structured_outputs_backend: str = Field(
        "llguidance", description="registered grammar backend that compiles structured-output requests"
    )
    engine_step_timeout: float = Field(
        300.0,
        gt=0,
        description="seconds one engine step may run before the engine counts as hung: a server then fails its "
        "requests, answers 503 on /health and exits non-zero so that a supervisor restarts it",
    )
    log_format: Literal["console", "json"] = Field("console", description="log output format")
    # The selected backend's own options (`Backend.options_class` fields) that the user gave, by flag or
    # `LLM(...)` keyword; the engine builds the options from them, and the options class reads the environment
    # for the rest. No flag of its own: each option is a flag (see `ernie_serve.cli_options`).
    backend_options: dict[str, Any] = Field(default_factory=dict, description="the backend's own options")
