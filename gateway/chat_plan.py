"""What a chat request's `tools`, `tool_choice`, `chat_template_kwargs` and `reasoning_max_tokens` mean: the
chat template's variables, the constraints on generation, and the parsers its answer goes through.

The rules (vLLM's, with FastDeploy's `reasoning_max_tokens`):
- `tool_choice` "none" (the default without tools): the tools still reach the template, the answer is not
  searched for calls.
- "auto" (the default with tools): the model decides; needs a server started with `--enable-auto-tool-choice`
  (and so `--tool-call-parser`), else a 400.
- "required" or a named function: enforced by a grammar (llguidance's lark dialect) that the tool-call parser
  writes for its format (`ToolParser.grammar`), so the answer is one call (or, with `parallel_tool_calls`,
  one or more) of the allowed functions with arguments that follow their `parameters` schema. Without
  `--tool-call-parser` the built-in `ernie45` format is used (the model family this server is for). With a
  reasoning parser and thinking on, the grammar lets the model reason first.
- `reasoning_max_tokens`: once that many tokens have been generated without the reasoning parser's end tag
  (`</think>`), the tag is forced (a per-sequence logits processor); needs `--reasoning-parser`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from ernie_serve.core.sampler import LogitsProcessor
from ernie_serve.core.sampling_params import SamplingParams, StructuredOutputsParams
from ernie_serve.gateway.errors import bad_request
from ernie_serve.gateway.parsers import (
    REASONING,
    TOOL_CALL,
    ChoiceParser,
    ParsedToolCall,
    ReasoningParser,
    TokenIdLookup,
    ToolParser,
    parser_class,
)
from ernie_serve.gateway.protocol import ChatCompletionRequest, FunctionCallOut, NamedToolChoice, ToolCallOut
from ernie_serve.gateway.settings import ServerSettings
from ernie_serve.structured_output import allow_only

# The tool-call format that enforces tool_choice "required"/named on a server without --tool-call-parser.
DEFAULT_TOOL_FORMAT = "ernie45"


@dataclass(frozen=True)
class ServerParsers:
    """The parser classes a server was started with; resolved once, when the app is built."""

    reasoning: type[ReasoningParser] | None = None
    tool_call: type[ToolParser] | None = None
    auto_tool_choice: bool = False

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> ServerParsers:
        """Raises `UnknownPluginError` (listing the registered ones) for a name no plugin registered."""
        reasoning = parser_class(REASONING, settings.reasoning_parser) if settings.reasoning_parser else None
        tool_call = parser_class(TOOL_CALL, settings.tool_call_parser) if settings.tool_call_parser else None
        return cls(reasoning, tool_call, settings.enable_auto_tool_choice)


@dataclass
class ChatPlan:
    """One chat request's part in all this, made by `plan_chat` before the prompt is rendered."""

    template_variables: dict[str, Any]  # for the chat template: chat_template_kwargs, plus `tools`
    reasoning: type[ReasoningParser] | None  # parse reasoning with this (None: no reasoning split)
    tool_parser: type[ToolParser] | None  # parse tool calls with this (None: tool_choice "none", or no tools)
    thinking: bool  # the request left thinking on
    functions: list[dict[str, Any]] = field(default_factory=list)  # the request's function definitions
    grammar: str | None = None  # enforces tool_choice "required" / a named function
    reasoning_budget: int | None = None  # reasoning_max_tokens, when it applies

    @property
    def parses(self) -> bool:
        """Whether the answer goes through parsers at all (else content is the text, as without them)."""
        return self.reasoning is not None or self.tool_parser is not None

    def choice_parser(self) -> ChoiceParser:
        """Fresh parsers for one choice (they may keep state between calls)."""
        reasoning = self.reasoning(thinking=self.thinking) if self.reasoning is not None else None
        tools = self.tool_parser(tools=self.functions) if self.tool_parser is not None else None
        return ChoiceParser(reasoning, tools)

    def constrain(self, params: SamplingParams, end_tag_ids: Callable[[str], list[int]]) -> SamplingParams:
        """The request's sampling params with this plan's constraints: the tool grammar as a structured output,
        the reasoning budget as a logits processor. `end_tag_ids(text)` encodes a tag into token ids."""
        if self.grammar is not None:
            if params.structured_outputs is not None:
                message = "tool_choice 'required' or a named function cannot be combined with a structured output"
                raise bad_request(message, "tool_choice")
            params = replace(params, structured_outputs=StructuredOutputsParams(grammar=self.grammar))
        if self.reasoning_budget is not None and self.reasoning is not None:
            budget = partial(ReasoningBudget, self.reasoning_budget, end_tag_ids(self.reasoning.end_tag))
            params = replace(params, logits_processors=[*params.logits_processors, budget])
        return params


def plan_chat(request: ChatCompletionRequest, server: ServerParsers, token_id: TokenIdLookup) -> ChatPlan:
    """Check the request's tool and reasoning options against each other and the server (400s naming the
    field), and decide what they mean. Called once per chat request, before its prompt is rendered;
    `token_id` gives the id of a text that is one special token, for the grammar."""
    functions = [tool.function.model_dump(exclude_none=True) for tool in request.tools or []]
    variables = dict(request.chat_template_kwargs or {})
    if request.tools:
        variables["tools"] = [tool.model_dump(exclude_none=True) for tool in request.tools]
    thinking = request.thinking
    plan = ChatPlan(variables, server.reasoning, None, thinking, functions)

    if request.reasoning_max_tokens is not None:
        if server.reasoning is None:
            raise bad_request(
                "reasoning_max_tokens needs a server started with --reasoning-parser", "reasoning_max_tokens"
            )
        plan.reasoning_budget = request.reasoning_max_tokens if thinking else None

    choice = request.effective_tool_choice
    if choice == "none":
        return plan
    if not request.tools:
        if choice == "auto":  # nothing to call
            return plan
        raise bad_request("tool_choice 'required' or a named function needs tools", "tool_choice")
    if choice == "auto":
        if not (server.auto_tool_choice and server.tool_call):
            message = '"auto" tool choice needs a server started with --enable-auto-tool-choice and --tool-call-parser'
            raise bad_request(message, "tool_choice")
        plan.tool_parser = server.tool_call
        return plan

    allowed = functions
    if isinstance(choice, NamedToolChoice):
        allowed = [f for f in functions if f["name"] == choice.function.name]
        if not allowed:
            known = ", ".join(f["name"] for f in functions)
            raise bad_request(
                f"tool_choice names function {choice.function.name!r}, not among tools: {known}", "tool_choice"
            )
    parser = server.tool_call or parser_class(TOOL_CALL, DEFAULT_TOOL_FORMAT)
    reasoning_first = server.reasoning is not None and thinking
    grammar = parser.grammar(allowed, request.parallel_tool_calls, token_id, reasoning_first)
    if grammar is None:
        what = "'required'" if choice == "required" else "naming a function"
        raise bad_request(f"the server's tool-call parser cannot enforce tool_choice {what}", "tool_choice")
    if reasoning_first:
        assert server.reasoning is not None
        grammar += "\n" + server.reasoning.grammar_rule(token_id)
    plan.tool_parser, plan.grammar = parser, grammar
    return plan


class ReasoningBudget(LogitsProcessor):
    """`reasoning_max_tokens` for one sequence: after `budget` tokens without the reasoning's end tag, the tag's
    tokens are forced, one per step; afterwards (or once the model wrote the tag itself) it does nothing."""

    def __init__(self, budget: int, end_ids: Sequence[int]) -> None:
        self.budget = budget
        self.end_ids = list(end_ids)
        self.count = 0  # tokens the sequence generated while reasoning
        self.tail: list[int] = []  # its last len(end_ids) tokens, to see the tag written by the model
        self.forced = -1  # how many of the tag's tokens were forced so far; -1: not forcing
        self.done = not self.end_ids

    def fill_bitmask(self, bitmask: Any) -> bool:
        if self.done or self.forced < 0:
            return False
        allow_only(bitmask, [self.end_ids[self.forced]])
        return True

    def accept_token(self, token_id: int) -> None:
        if self.done:
            return
        if self.forced >= 0:
            self.forced += 1
            self.done = self.forced == len(self.end_ids)
            return
        self.count += 1
        self.tail = [*self.tail, token_id][-len(self.end_ids) :]
        if self.tail == self.end_ids:
            self.done = True  # the model ended its reasoning itself
        elif self.count >= self.budget:
            self.forced = 0


def tool_call_out(call: ParsedToolCall) -> ToolCallOut:
    """A parsed call as the response carries it, with a new id."""
    return ToolCallOut(
        id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCallOut(name=call.name, arguments=call.arguments)
    )


def finish_reason(reason: str | None, made_calls: bool) -> str | None:
    """OpenAI's finish reason: "tool_calls" when a choice that stopped by itself made tool calls."""
    return "tool_calls" if made_calls and reason == "stop" else reason
