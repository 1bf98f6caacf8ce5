"""Per-request sampling options, shaped like vLLM's `SamplingParams`.

Pure Python (no torch): the scheduler and the gateway validate and read these without touching tensors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from ernie_serve.core.errors import UserError

if TYPE_CHECKING:
    from ernie_serve.core.sampler import LogitsProcessor

# What a torch generator accepts as a seed: any signed or unsigned 64-bit value.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
_NO_PROMPT_LOGPROBS = "is not supported: backends return logits only for the positions that sample"


class SamplingParamsError(UserError, ValueError):
    """A sampling option out of range; `param` names the offending field (the gateway puts it in the 400)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class StructuredOutputsParams:
    """vLLM's: the output follows a JSON schema, a regex, one of some strings, a lark grammar (llguidance's dialect)
    or is any JSON object; exactly one is set. Compiled by the frontend's grammar backend (a spec it cannot compile
    is a `SamplingParamsError` there)."""

    json: dict[str, Any] | str | None = None  # a JSON schema, as a dict or its JSON text
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        given = [kind for kind in _KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            raise SamplingParamsError("structured_outputs", f"structured_outputs: set exactly one of {_ONE_OF}")
        choices_ok = self.choice is None or all(isinstance(c, str) and c for c in self.choice or [None])
        if not isinstance(getattr(self, given[0]), _KINDS[given[0]]) or not choices_ok:
            raise SamplingParamsError(
                "structured_outputs", f"structured_outputs.{given[0]} is empty or of the wrong type"
            )

    @property
    def key(self) -> tuple[str, str]:
        """(kind, spec as text): what the grammar backend compiles, and the key of compiled grammars' cache."""
        kind = next(kind for kind in _KINDS if getattr(self, kind) not in (None, False))
        value = getattr(self, kind)
        return kind, value if isinstance(value, str) else json.dumps(value, sort_keys=True)


_KINDS = {"json": (dict, str), "regex": str, "choice": list, "grammar": str, "json_object": bool}  # and their types
_ONE_OF = ", ".join(_KINDS)


@dataclass
class SamplingParams:
    """How to pick tokens for one request.

    `temperature` and `top_p` default to `None`, meaning "not said by the request": the engine then takes the
    checkpoint's `generation_config.json` values (ERNIE's card recommends 0.8 / 0.8), or 1.0 when it has none.
    """

    n: int = 1  # completions per prompt
    temperature: float | None = None  # 0 means greedy
    top_p: float | None = None  # nucleus mass in (0, 1]
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0  # drop tokens below min_p * p(max)
    seed: int | None = None  # per-request generator; same seed, same output whatever the batch
    stop: list[str] = field(default_factory=list)  # stop strings, cut from the text
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop tokens, kept in token_ids
    max_tokens: int | None = 16  # None: up to the context limit
    min_tokens: int = 0  # eos/stop tokens are masked until this many tokens exist
    presence_penalty: float = 0.0  # OpenAI meaning, over generated tokens
    frequency_penalty: float = 0.0  # OpenAI meaning, over generated tokens
    repetition_penalty: float = 1.0  # CTRL meaning, over prompt and generated tokens
    ignore_eos: bool = False  # keep going past eos / <|end_of_sentence|>
    logprobs: int | None = None  # None: none; 0: the sampled token's; k: plus the top k
    prompt_logprobs: int | None = None  # vLLM's name; not implemented: any value is refused
    skip_special_tokens: bool = True  # leave special tokens out of the detokenized text
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None
    # Factories of per-sequence constraints (`LogitsProcessor`), each called once for every sequence the
    # engine adds (each of `n` gets its own), for callers that constrain tokens without a grammar.
    logits_processors: list[Callable[[], LogitsProcessor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        self.validate()

    def validate(self) -> None:
        """Raise `SamplingParamsError` naming the first field out of range."""
        temperature, top_p, max_tokens, seed = self.temperature, self.top_p, self.max_tokens, self.seed
        rules: list[tuple[bool, str, str]] = [  # (holds, field, what it must be: "{}" stands for its value)
            (self.n >= 1, "n", "must be at least 1, got {}"),
            (temperature is None or temperature >= 0, "temperature", "must be >= 0, got {}"),
            (top_p is None or 0 < top_p <= 1, "top_p", "must be in (0, 1], got {}"),
            (self.top_k >= -1, "top_k", "must be -1 (disabled) or >= 0, got {}"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1], got {}"),
            (max_tokens is None or max_tokens >= 1, "max_tokens", "must be at least 1, got {}"),
            (self.min_tokens >= 0, "min_tokens", "must be >= 0, got {}"),
            (
                max_tokens is None or self.min_tokens <= max_tokens,
                "min_tokens",
                f"({self.min_tokens}) must not exceed max_tokens ({max_tokens})",
            ),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2], got {}"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2], got {}"),
            (self.repetition_penalty > 0, "repetition_penalty", "must be > 0, got {}"),
            (self.logprobs is None or self.logprobs >= 0, "logprobs", "must be >= 0, got {}"),
            (all(self.stop), "stop", "strings must not be empty"),
            (seed is None or SEED_MIN <= seed <= SEED_MAX, "seed", f"must be in [{SEED_MIN}, {SEED_MAX}], got {{}}"),
            (self.prompt_logprobs is None, "prompt_logprobs", _NO_PROMPT_LOGPROBS),
        ]
        for holds, param, rule in rules:
            if not holds:
                raise SamplingParamsError(param, f"{param} {rule.format(getattr(self, param))}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_defaults(self, temperature: float | None, top_p: float | None) -> SamplingParams:
        """A copy with the unset temperature/top_p filled from the checkpoint's generation config."""
        return replace(
            self,
            temperature=_first_set(self.temperature, temperature, 1.0),
            top_p=_first_set(self.top_p, top_p, 1.0),
        )

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def _first_set(*values: float | None) -> float:
    return next(v for v in values if v is not None)
