"""Server options (`ernie-serve serve`): where to listen, who may call, how much load to take.

Engine options live in `EngineSettings`; the CLI builds one flag per field of both classes. FastDeploy's
serving flags that mean nothing for an in-process engine are accepted here so the model card's command lines
run unchanged; `inert_option_notes` says which of them were given, for one log line each.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# FastDeploy's name for the key variable; read when ERNIE_SERVE_API_KEY and --api-key are both absent.
FD_API_KEY_ENV = "FD_API_KEY"


class ServerSettings(BaseSettings):
    """Every gateway option. Field names are FastDeploy/vLLM flag names with `_` for `-`."""

    model_config = SettingsConfigDict(env_prefix="ERNIE_SERVE_", extra="forbid", validate_assignment=True)

    host: str = Field("0.0.0.0", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port of the OpenAI API")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="also serve /metrics on this port (default: only on --port)"
    )
    served_model_name: str | None = Field(None, description="model name in the API (default: the --model value)")
    # `list[str] | str` rather than `list[str]`: pydantic-settings then passes a plain env string through
    # instead of failing to parse it as JSON; `_split_keys` turns "a,b" into two keys.
    api_key: list[str] | str = Field(
        default_factory=list,
        description="API key clients must send as 'Authorization: Bearer KEY'; repeat the flag for several "
        "keys (env ERNIE_SERVE_API_KEY or FD_API_KEY, comma-separated; default: no authentication)",
    )
    max_concurrency: int | None = Field(
        None, ge=1, description="most generation requests in flight; more get HTTP 429 (default: no limit)"
    )
    # A few MB: a full 128K-token context as JSON-escaped text is ~1-2 MB, while a 10 MB body already takes
    # seconds to template and tokenize and hundreds of MB of memory.
    max_request_body_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1,
        description="largest request body in bytes; a larger one gets HTTP 413 before it is read in full",
    )
    shutdown_timeout: float = Field(
        30.0, ge=0, description="seconds in-flight requests may run after SIGTERM before they are aborted"
    )
    reasoning_parser: str | None = Field(
        None,
        description="split chat answers into reasoning_content and content with this registered reasoning parser "
        "(built-in: ernie45, alias ernie-x1; default: none, reasoning stays in content)",
    )
    tool_call_parser: str | None = Field(
        None,
        description="turn tool calls in chat answers into tool_calls with this registered tool-call parser "
        "(built-in: ernie45, alias ernie-x1; default: none)",
    )
    enable_auto_tool_choice: bool = Field(
        False, description="let the model decide whether to call tools (tool_choice 'auto'); needs --tool-call-parser"
    )
    # Accepted for FastDeploy command lines; they have no effect here (see `inert_option_notes`).
    engine_worker_queue_port: int | None = Field(
        None, description="FastDeploy's engine queue port; no effect here (the engine runs in-process)"
    )
    plas_attention_config: str | None = Field(
        None, description="FastDeploy's PLAS sparse-attention JSON; no effect here (full attention only)"
    )

    @field_validator("api_key", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str | int | float):  # env values that happened to parse as JSON numbers
            value = [str(value)]
        keys = [k.strip() for item in value for k in str(item).split(",")]
        return [k for k in keys if k]

    @field_validator("enable_auto_tool_choice")
    @classmethod
    def _auto_needs_parser(cls, enabled: bool, info: ValidationInfo) -> bool:
        if enabled and not info.data.get("tool_call_parser"):
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (which format to read calls in)")
        return enabled

    @model_validator(mode="before")
    @classmethod
    def _fastdeploy_key(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("api_key") and os.environ.get(FD_API_KEY_ENV):
            data = {**data, "api_key": os.environ[FD_API_KEY_ENV]}
        return data

    @property
    def api_keys(self) -> list[str]:
        return list(self.api_key) if isinstance(self.api_key, list) else [self.api_key]


def inert_option_notes(server: ServerSettings) -> list[str]:
    """One line per given server option that has no effect here, for the log at start-up (the engine reports
    engine options its backend does not implement, such as `--quantization`, when it loads)."""
    notes = []
    if server.engine_worker_queue_port is not None:
        notes.append("--engine-worker-queue-port has no effect here: the engine runs in the server process")
    if server.plas_attention_config is not None:
        notes.append("--plas-attention-config has no effect here: PLAS sparse attention is not implemented")
    return notes
