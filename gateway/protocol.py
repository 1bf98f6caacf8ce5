"""OpenAI's request and response bodies as pydantic models, plus vLLM's sampling extensions.

Requests are validated strictly (a string where a number belongs is a 400, as OpenAI answers), unknown fields
are kept in `model_extra` and otherwise ignored (the OpenAI SDK forwards `extra_body` keys as top-level
fields, and plugins read their extensions from there), and parameters we do not implement yet are refused by
`unsupported_parameter` rather than silently ignored.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from ernie_serve.core.sampling_params import SamplingParams, StructuredOutputsParams


class RequestModel(BaseModel):
    """Base of request bodies: strict types, unknown fields kept (for plugins) and ignored."""

    model_config = ConfigDict(extra="allow", strict=True)


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="allow")


# ----- requests ------------------------------------------------------------------------------------------


class StreamOptions(RequestModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage on every chunk


class TextContentPart(RequestModel):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> TextContentPart:
        if self.type != "text":
            raise ValueError(f"content part type {self.type!r} is not supported: only 'text' parts are")
        if self.text is None:
            raise ValueError("a text content part needs a 'text' string")
        return self


class FunctionCallText(RequestModel):
    """A function call as OpenAI writes it: the arguments object as JSON text."""

    name: str
    arguments: str


class ToolCallRecord(RequestModel):
    """A tool call an assistant turn in the history made."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallText


class ChatMessage(RequestModel):
    """One turn. `developer` is OpenAI's newer name for `system` and is rendered as one; `tool` carries a tool's
    result (for the call `tool_call_id`), after an assistant turn with `tool_calls`."""

    role: str
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallRecord] | None = None  # assistant turns only
    tool_call_id: str | None = None  # tool turns only

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role == "function":
            raise ValueError("'function' messages (OpenAI's deprecated functions API) are not supported: use 'tool'")
        if role not in ("system", "user", "assistant", "developer", "tool"):
            raise ValueError(f"unknown role {role!r}: use 'system', 'user', 'assistant' or 'tool'")
        return role

    @model_validator(mode="after")
    def _content_present(self) -> ChatMessage:
        extra = self.model_extra or {}
        if extra.get("function_call"):
            raise ValueError("'function_call' (OpenAI's deprecated functions API) is not supported: use 'tool_calls'")
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"a '{self.role}' message cannot have tool_calls: only assistant turns make them")
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a '{self.role}' message needs content")
        return self

    def text(self) -> str:
        """The content as one string; text parts are joined with newlines (as vLLM does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text or "" for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The turn as chat templates read it (HF's convention): tool-call arguments as objects, not JSON text."""
        role = "system" if self.role == "developer" else self.role
        turn: dict[str, Any] = {"role": role, "content": self.text()}
        if self.tool_calls:
            turn["tool_calls"] = [
                {"id": c.id, "type": c.type, "function": {"name": c.function.name, "arguments": _json_or_text(c)}}
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            turn["tool_call_id"] = self.tool_call_id
        return turn


def _json_or_text(call: ToolCallRecord) -> Any:
    """The call's arguments parsed, or the text as it is when it is not JSON (a template still renders it)."""
    try:
        return json.loads(call.function.arguments)
    except ValueError:
        return call.function.arguments


class FunctionDefinition(RequestModel):
    """A function the model may call: OpenAI's `tools[].function`."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None  # accepted; a call is always checked against `parameters` when tool_choice forces it


class ToolDefinition(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    """`tool_choice` naming the function the model must call."""

    type: Literal["function"]
    function: FunctionName


# Template variables the gateway sets itself; `chat_template_kwargs` may not replace them.
RESERVED_TEMPLATE_VARIABLES = ("messages", "add_generation_prompt", "tools")


class JsonSchemaFormat(RequestModel):
    """OpenAI's `response_format.json_schema`. `strict` is accepted and has no effect: output that follows the
    schema is always enforced, never merely asked for."""

    model_config = ConfigDict(populate_by_name=True)

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # None: any JSON object (`schema` is taken)
    strict: bool | None = None


class ResponseFormat(RequestModel):
    """OpenAI's `response_format`: free text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type 'json_schema' needs a 'json_schema' object")
        return self


class StructuredOutputsRequest(RequestModel):
    """vLLM's `structured_outputs` request field: exactly one of these (the engine says so otherwise)."""

    model_config = ConfigDict(populate_by_name=True)

    json_schema: dict[str, Any] | str | None = Field(None, alias="json")  # `json` would shadow BaseModel.json
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


# vLLM's older request fields for the same constraints, and the kind each one sets
_GUIDED_FIELDS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
_CONSTRAINT_FIELDS = ("response_format", "structured_outputs", *_GUIDED_FIELDS)

MAX_STOP_STRINGS = 256  # OpenAI allows 4; vLLM users pass dozens


class SamplingRequest(RequestModel):
    """Fields shared by chat and completions: OpenAI's sampling parameters and vLLM's extensions."""

    model: str | None = None
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    n: int = Field(1, ge=1, le=128)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    user: str | None = None
    # vLLM's extensions
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)  # the only float without a top
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    priority: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None

    @field_validator("stop")
    @classmethod
    def _stops_not_empty(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if stop is not None and any(s == "" for s in ([stop] if isinstance(stop, str) else stop)):
            raise ValueError("stop strings must not be empty")
        # Every stop string is searched for after every token, in the engine thread: 100,000 of them made
        # each step of every request 300 ms slower.
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stop)}")
        return stop

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @model_validator(mode="after")
    def _one_constraint(self) -> SamplingRequest:
        given = [name for name in _CONSTRAINT_FIELDS if self._constraint(name)]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} both constrain the output: use one of them")
        return self

    def _constraint(self, name: str) -> Any:
        """The value of a field that constrains the output, or None when it is unset (or `text`)."""
        if name == "response_format":
            return self.response_format if self.response_format and self.response_format.type != "text" else None
        return getattr(self, name) if name == "structured_outputs" else (self.model_extra or {}).get(name)

    @property
    def constraint_field(self) -> str | None:
        """The request field the structured-output constraint came from (for the `param` of its errors)."""
        return next((name for name in _CONSTRAINT_FIELDS if self._constraint(name)), None)

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The constraint as the engine's `StructuredOutputsParams`; raises `SamplingParamsError` when it is not
        exactly one kind."""
        name = self.constraint_field
        if name is None:
            return None
        if name == "response_format":
            assert self.response_format is not None
            schema = self.response_format.json_schema.schema_ if self.response_format.json_schema else None
            return StructuredOutputsParams(json=schema) if schema else StructuredOutputsParams(json_object=True)
        if name in _GUIDED_FIELDS:
            return StructuredOutputsParams(**{_GUIDED_FIELDS[name]: self._constraint(name)})
        spec = self.structured_outputs
        assert spec is not None
        # The declared fields only: unknown keys are kept in model_extra and, as everywhere, ignored.
        given = {name: getattr(spec, name) for name in type(spec).model_fields if getattr(spec, name) is not None}
        return StructuredOutputsParams(**{"json" if k == "json_schema" else k: v for k, v in given.items()})

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def _sampling_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=self.stop_list(),
            stop_token_ids=list(self.stop_token_ids or []),
            min_tokens=self.min_tokens,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            structured_outputs=self.structured_outputs_params(),
        )
        if self.top_k is not None:
            kwargs["top_k"] = self.top_k
        if self.min_p is not None:
            kwargs["min_p"] = self.min_p
        if self.repetition_penalty is not None:
            kwargs["repetition_penalty"] = self.repetition_penalty
        return kwargs

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """vLLM's `continuous_usage_stats`: usage on every streamed chunk."""
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


# name -> the values that mean "not used"; any other value is a 400 naming the parameter.
_UNSUPPORTED_COMMON: dict[str, tuple[Any, ...]] = {
    "logit_bias": (None, {}),
    "functions": (None, []),
    "function_call": (None, "none"),
    "audio": (None,),
    "prediction": (None,),
    "prompt_logprobs": (None,),  # backends return logits only for the positions that sample
}


def unsupported_parameter(request: RequestModel) -> tuple[str, str] | None:
    """(parameter, message) for the first parameter the request uses that we do not implement yet."""
    fields = {**request.__dict__, **(request.model_extra or {})}
    table = dict(_UNSUPPORTED_COMMON)
    if isinstance(request, CompletionRequest):  # tools are a chat feature
        table.update(suffix=(None, ""), tools=(None, []), tool_choice=(None, "none"))
    for name, unused in table.items():
        if name in fields and not any(fields[name] == u and type(fields[name]) is type(u) for u in unused):
            return name, f"'{name}' is not supported yet by ernie-serve"
    modalities = fields.get("modalities")
    if modalities is not None and modalities != ["text"]:
        return "modalities", "only the 'text' modality is supported"
    best_of = fields.get("best_of")
    if best_of is not None and best_of != fields.get("n", 1):
        return "best_of", "best_of other than n is not supported yet"
    return None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True  # vLLM extension
    tools: list[ToolDefinition] | None = None
    # None: "auto" when there are tools, else "none" (OpenAI's defaults)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM: extra template variables, e.g. enable_thinking
    reasoning_max_tokens: int | None = Field(None, ge=1)  # FastDeploy: most tokens of reasoning

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self

    @model_validator(mode="after")
    def _tools_consistent(self) -> ChatCompletionRequest:
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) < len(names):
            raise ValueError("tools: function names must be unique")
        reserved = sorted(set(self.chat_template_kwargs or {}) & set(RESERVED_TEMPLATE_VARIABLES))
        if reserved:
            raise ValueError(f"chat_template_kwargs may not set {', '.join(reserved)}: they are request fields")
        return self

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        """`tool_choice`, or its default: "auto" when the request has tools, else "none"."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    @property
    def thinking(self) -> bool:
        """False when the request turned thinking off (`chat_template_kwargs: {"enable_thinking": false}`)."""
        return (self.chat_template_kwargs or {}).get("enable_thinking", True) is not False

    @property
    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def sampling_params(self) -> SamplingParams:
        """Raises `SamplingParamsError` naming the field when a value is out of range."""
        return SamplingParams(
            **self._sampling_kwargs(),
            max_tokens=self.effective_max_tokens,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
        )


PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingRequest):
    prompt: Any
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("prompt")
    @classmethod
    def _prompt_shape(cls, prompt: Any) -> PromptInput:
        """A string, a list of strings, a list of token ids, or a list of token-id lists (OpenAI's four)."""
        ok = False
        if isinstance(prompt, str):
            ok = True
        elif isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                ok = True
            elif all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                ok = True
            elif all(
                isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
                for p in prompt
            ):
                ok = True
        if not ok:
            raise ValueError(
                "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists, "
                "and not empty"
            )
        return prompt

    @model_validator(mode="after")
    def _echo_logprobs(self) -> CompletionRequest:
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs is not supported yet (prompt logprobs are not computed)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of single prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(t, int) for t in p):
            return [list(p)]
        return list(p)

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(**self._sampling_kwargs(), max_tokens=self.max_tokens, logprobs=self.logprobs)


# ----- responses -----------------------------------------------------------------------------------------


class UsageInfo(ResponseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class TopLogprob(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(ResponseModel):
    content: list[ChatTokenLogprob] | None = None


class FunctionCallOut(ResponseModel):
    name: str
    arguments: str  # the arguments object as JSON text


class ToolCallOut(ResponseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatResponseMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    # With --reasoning-parser: the reasoning, under vLLM's older and newer names (null without a parser).
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCallOut] = Field(default_factory=list)


class DeltaToolCall(ResponseModel):
    """A tool call in a stream: sent whole, once, in the chunk where its closing tag arrives."""

    index: int  # of the call within the choice's tool calls
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatCompletionChoice(ResponseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM: the stop string or token that ended it


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(ResponseModel):
    """Only the keys that are set, as OpenAI streams them: `{"role": ...}` first, then `{"content": ...}`,
    and `{}` in the chunk that carries the finish reason."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _set_keys_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionStreamChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class _OmitNullUsage(ResponseModel):
    """Stream chunks carry `usage` only when it is asked for (`stream_options`)."""

    @model_serializer(mode="wrap")
    def _omit_null_usage(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if data.get("usage", 0) is None:
            del data["usage"]
        return data


class ChatCompletionChunk(_OmitNullUsage):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


class CompletionLogprobs(ResponseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(_OmitNullUsage):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "ernie-serve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
