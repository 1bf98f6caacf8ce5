"""Output parsers: a chat choice's text split into reasoning, answer and tool calls.

A server started with `--reasoning-parser NAME` and/or `--tool-call-parser NAME` makes, for every choice of
every chat request, one instance of each parser it names (classes registered through the `register_parsers`
hook; the built-in `ernie45` pair is plugins/ernie45.py). The gateway feeds them the choice's whole text so
far each time it grows and once more when the choice ends; the reasoning parser runs first, the tool-call
parser reads the answer it leaves. Both work on text in which the model's markup (`</think>`, `<tool_call>`,
...) is kept even when it is a special token (`ernie_serve.tokenizer.MARKUP_TOKENS`).

The one contract streaming relies on: every field of a result begins with the same field of the previous
result for the same choice (text is only ever added at the end; a tool call, once returned, stays as it is).
Text that may still turn out to be markup (a tag cut off at the end) is left out until the next call settles
it, so what was streamed is always a prefix of the final message. `held_back` computes that tail.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ernie_serve.core.plugins import UnknownPluginError, registry

REASONING = "reasoning"  # the `kind` a reasoning parser is registered under
TOOL_CALL = "tool_call"  # the `kind` a tool-call parser is registered under

# What a grammar builder asks the tokenizer: the id of a text that is one special vocabulary token, else None.
# A grammar must match a special token by its id (no text spells it); any other text, as text.
TokenIdLookup = Callable[[str], "int | None"]


@dataclass(frozen=True)
class ReasoningSplit:
    """What `ReasoningParser.split` returns: the reasoning and the answer, both without their markup."""

    reasoning: str
    content: str


@dataclass(frozen=True)
class ParsedToolCall:
    """One complete tool call the model made."""

    name: str
    arguments: str  # the arguments object as JSON text


@dataclass(frozen=True)
class ToolSplit:
    """What `ToolParser.split` returns: the text that is not a tool call, and the tool calls, in order."""

    content: str
    calls: tuple[ParsedToolCall, ...] = ()


class ReasoningParser(ABC):
    """Separates one choice's reasoning from its answer. Subclass it and register it as a "reasoning" parser.

    The gateway makes one instance per choice, then calls `split` with the choice's text so far every time it
    grows (streaming: once per engine step) and once with `finished=True` when the choice has ended.
    """

    # The text that ends the reasoning. `reasoning_max_tokens` forces it once the budget is spent, and grammars
    # that constrain the answer (tool_choice "required") let the reasoning run until it.
    end_tag: ClassVar[str] = "</think>"

    def __init__(self, thinking: bool = True) -> None:
        # False when the request turned thinking off (`chat_template_kwargs: {"enable_thinking": false}`):
        # then the whole text is the answer.
        self.thinking = thinking

    @abstractmethod
    def split(self, text: str, finished: bool) -> ReasoningSplit:
        """The reasoning and the answer in `text`, the choice's whole text so far. Called on the event loop, so
        keep it to string operations; each result must extend the previous one (see the module docstring)."""

    @classmethod
    def grammar_rule(cls, token_id: TokenIdLookup) -> str:
        """Lark rules (llguidance's dialect) defining `reasoning`: any text up to and including `end_tag`, for a
        grammar that constrains the answer after it. Called when such a grammar is built for a request."""
        end = token_id(cls.end_tag)
        gap = "REASONING_GAP: /\\n+/"  # the newlines between the reasoning and the answer
        if end is not None:  # a special token: llguidance matches it by id, and no text can spell it
            return "\n".join([f"reasoning: REASONING_TEXT <[{end}]> REASONING_GAP?", "REASONING_TEXT: /(?s:.*)/", gap])
        tag = _regex_escape(cls.end_tag)
        return "\n".join(["reasoning: reasoning_text REASONING_GAP?", f"reasoning_text[lazy]: /(?s:.*){tag}/", gap])


class ToolParser(ABC):
    """Finds tool calls in one choice's answer. Subclass it and register it as a "tool_call" parser.

    The gateway makes one instance per choice of a request that may call tools (tool_choice other than
    "none"), with the request's function definitions, and calls `split` like `ReasoningParser.split` with the
    answer so far (what the reasoning parser, if any, left).
    """

    def __init__(self, tools: Sequence[Mapping[str, Any]] = ()) -> None:
        self.tools = list(tools)  # OpenAI function definitions: {"name", "description", "parameters"}

    @abstractmethod
    def split(self, text: str, finished: bool) -> ToolSplit:
        """The text that is not a tool call, and the complete tool calls so far. A call whose JSON is malformed
        stays in the text, markup and all. Called on the event loop; each result must extend the previous one."""

    @classmethod
    def grammar(
        cls, tools: Sequence[Mapping[str, Any]], parallel: bool, token_id: TokenIdLookup, reasoning: bool
    ) -> str | None:
        """A lark grammar (llguidance's dialect) that accepts exactly the output `split` turns into tool calls of
        `tools` (one call, or one or more when `parallel`), each call's arguments following its function's
        `parameters` schema; with `reasoning`, starting with the `reasoning` rule (defined by the reasoning
        parser, appended by the caller); `token_id` gives the id of a tag that is a special token. Called per
        request for tool_choice "required" or a named function, which are enforced with it. None (the
        default): this parser cannot, and those requests get a 400."""
        return None


def _regex_escape(text: str) -> str:
    """`text` as a literal inside a lark `/.../` regex."""
    return "".join(f"\\{c}" if c in "\\/.^$*+?()[]{}|-" else c for c in text)


def call_schema(function: Mapping[str, Any], name_key: str = "name", arguments_key: str = "arguments") -> dict:
    """The JSON schema of one call of `function` as the object `{name_key: its name, arguments_key: {...}}`;
    for parsers whose models write calls as JSON objects."""
    return {
        "type": "object",
        "properties": {
            name_key: {"const": function["name"]},
            arguments_key: closed_parameters(function.get("parameters") or {"type": "object"}),
        },
        "required": [name_key, arguments_key],
        "additionalProperties": False,
    }


def closed_parameters(parameters: Mapping[str, Any]) -> Mapping[str, Any]:
    """A tool's parameters schema as a forced call's grammar enforces it: one that lists its properties and does
    not say whether others may appear gets `additionalProperties: false` (OpenAI's strict mode), so that a
    constrained model cannot invent arguments the tool does not take, nor write an extra key without end."""
    if "properties" in parameters and "additionalProperties" not in parameters:
        return {**parameters, "additionalProperties": False}
    return parameters


def held_back(text: str, *tags: str) -> int:
    """How many characters at the end of `text` could be the beginning of one of `tags` (a proper prefix of
    it): the part a parser leaves out until the next text settles it."""
    hold = 0
    for tag in tags:
        for k in range(min(len(tag) - 1, len(text)), hold, -1):
            if text.endswith(tag[:k]):
                hold = k
                break
    return hold


def parser_class(kind: str, name: str) -> type:
    """The parser class registered as `name` for `kind` (REASONING or TOOL_CALL), checked to be of the right
    base class. Called when the gateway is built; `UnknownPluginError` lists the registered names."""
    parsers = registry().parsers
    registration = parsers.get(f"{kind}:{name}")
    base = ReasoningParser if kind == REASONING else ToolParser
    if registration is None:
        known = sorted(key.split(":", 1)[1] for key in parsers if key.startswith(f"{kind}:"))
        known_text = ", ".join(known) or "none"
        label = kind.replace("_", "-")
        message = f"unknown {label} parser {name!r}; registered {label} parsers: {known_text}"
        raise UnknownPluginError(message + " (see `ernie-serve plugins`)")
    cls = registration.obj
    if not issubclass(cls, base):
        raise UnknownPluginError(f"{kind} parser {name!r} ({cls.__qualname__}) is not a {base.__qualname__} subclass")
    return cls


@dataclass(frozen=True)
class ParsedOutput:
    """One choice's text as the client sees it."""

    reasoning: str
    content: str
    tool_calls: tuple[ParsedToolCall, ...] = ()


class ChoiceParser:
    """The parsers of one chat choice, chained: reasoning first, tool calls in what it leaves."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolParser | None) -> None:
        self.reasoning = reasoning
        self.tools = tools

    def parse(self, text: str, finished: bool) -> ParsedOutput:
        """Called with the choice's whole text each time it grows, and once with `finished` at its end."""
        reasoning, content = "", text
        if self.reasoning is not None:
            split = self.reasoning.split(text, finished)
            reasoning, content = split.reasoning, split.content
        if self.tools is None:
            return ParsedOutput(reasoning, content)
        tool_split = self.tools.split(content, finished)
        return ParsedOutput(reasoning, tool_split.content, tool_split.calls)


@dataclass
class StreamedParse:
    """How much of one streamed choice's parsed output has been sent."""

    reasoning: int = 0  # characters of the reasoning sent
    content: int = 0  # characters of the content sent
    calls: int = 0  # tool calls sent

    def advance(self, parsed: ParsedOutput) -> tuple[str, str, list[tuple[int, ParsedToolCall]]]:
        """The reasoning text, content text and (index, call) pairs not sent yet; all of them count as sent."""
        reasoning, content = parsed.reasoning[self.reasoning :], parsed.content[self.content :]
        self.reasoning, self.content = len(parsed.reasoning), len(parsed.content)
        new = list(enumerate(parsed.tool_calls))[self.calls :]
        self.calls = len(parsed.tool_calls)
        return reasoning, content, new


def arguments_json(value: Any) -> str | None:
    """A tool call's `arguments` as JSON text: an object is serialized, a string holding a JSON object is kept;
    anything else is None (the call is malformed)."""
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, str):
        parsed = loads_strict(value)
        return value if isinstance(parsed, dict) else None
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_strict(text: str) -> Any:
    """`json.loads` that returns None instead of raising, for model output: NaN/Infinity (not JSON) and nesting
    too deep for Python's parser count as malformed too."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None
