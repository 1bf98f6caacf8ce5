"""ERNIE 4.5's reasoning and tool-call formats, as the built-in `ernie45` parsers (also named `ernie-x1`, as
FastDeploy calls them): `--reasoning-parser ernie45 --tool-call-parser ernie45`.

ERNIE-4.5 Thinking models write

    reasoning\\n</think>\\n\\n<response>\\nanswer\\n</response>\\n

usually without an opening `<think>` (the chat template opens it), or, to call tools, one or more

    <tool_call>\\n{"name": "get_weather", "arguments": {"city": "Paris"}}\\n</tool_call>\\n

after `</think>`. The tags may be single vocabulary tokens; the text the parsers read keeps them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ernie_serve.core.hookspecs import RegisterParser, hookimpl
from ernie_serve.gateway.parsers import (
    ParsedToolCall,
    ReasoningParser,
    ReasoningSplit,
    TokenIdLookup,
    ToolParser,
    ToolSplit,
    arguments_json,
    call_schema,
    held_back,
    loads_strict,
)

THINK_START, THINK_END = "<think>", "</think>"
RESPONSE_START, RESPONSE_END = "<response>", "</response>"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"
# An output that begins with one of these has no reasoning (thinking was off, or the model skipped it).
_ANSWER_STARTS = (RESPONSE_START, TOOL_CALL_START)

NAMES = ("ernie45", "ernie-x1")

# How a forced call's JSON may be spaced (llguidance's `x-guidance` options): as ERNIE writes it (`{"a": 1, ...}`)
# or compact, and no other whitespace; with any whitespace allowed (llguidance's default) a weak model can write
# newlines until max_tokens.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ?", "key_separator": ": ?"}


def _settle(text: str, finished: bool, *tags: str) -> str:
    """`text` without what may still change: while the choice runs, a cut-off tag at the end and the newlines
    before it (ERNIE puts one before each closing tag, and the tag's own newline is not part of the text)."""
    if not finished:
        text = text[: len(text) - held_back(text, *tags)]
    return text.rstrip("\n")


class Ernie45ReasoningParser(ReasoningParser):
    """`reasoning\\n</think>\\n\\n<response>\\nanswer\\n</response>`: the reasoning is what comes before
    `</think>`, the answer the inside of `<response>` (or all that follows `</think>` when there is no
    `<response>`, as before tool calls). Without `</think>`, all of it is reasoning (an answer cut off by
    max_tokens while thinking) unless it begins with `<response>` or `<tool_call>`, or thinking is off."""

    end_tag = THINK_END

    def split(self, text: str, finished: bool) -> ReasoningSplit:
        if not self.thinking:
            return ReasoningSplit("", self._answer(text, finished))
        start = text.lstrip()
        if not finished and any(tag.startswith(start) for tag in (THINK_START, *_ANSWER_STARTS)):
            return ReasoningSplit("", "")  # too little text to tell how it begins
        if start.startswith(_ANSWER_STARTS):
            return ReasoningSplit("", self._answer(text, finished))
        body = start.removeprefix(THINK_START)
        head, tag, tail = body.partition(THINK_END)
        if not tag:
            return ReasoningSplit(_settle(head, finished, THINK_END).lstrip("\n"), "")
        return ReasoningSplit(head.strip("\n"), self._answer(tail, finished))

    @staticmethod
    def _answer(text: str, finished: bool) -> str:
        """The answer after `</think>`: the inside of `<response>...</response>` (what follows it is dropped),
        else the text itself."""
        text = text.lstrip("\n")
        if not finished and RESPONSE_START.startswith(text):
            return ""
        if not text.startswith(RESPONSE_START):
            return text
        inside, tag, _ = text[len(RESPONSE_START) :].lstrip("\n").partition(RESPONSE_END)
        return inside.rstrip("\n") if tag else _settle(inside, finished, RESPONSE_END)


class Ernie45ToolParser(ToolParser):
    """`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks, any number, anywhere in the answer.
    The text around them is the content (whitespace next to a call dropped); a block whose JSON is not such an
    object stays in the content as written, and so does one the choice ended inside of."""

    def split(self, text: str, finished: bool) -> ToolSplit:
        parts: list[str] = []
        calls: list[ParsedToolCall] = []
        pos, after_call = 0, False
        while True:
            start = text.find(TOOL_CALL_START, pos)
            before = text[pos:] if start == -1 else text[pos:start]
            if after_call:
                before = before.lstrip()
            if start == -1:
                if not finished:  # a call may still begin here: hold a cut-off tag and the whitespace before it
                    before = before[: len(before) - held_back(before, TOOL_CALL_START)].rstrip()
                parts.append(before)
                break
            end = text.find(TOOL_CALL_END, start + len(TOOL_CALL_START))
            if end == -1:  # an open block: as text if the choice ended in it, else held until it closes
                parts.append(before + text[start:] if finished else before.rstrip())
                break
            call = _parse_call(text[start + len(TOOL_CALL_START) : end])
            if call is None:
                parts.append(before + text[start : end + len(TOOL_CALL_END)])
            else:
                parts.append(before.rstrip())
                calls.append(call)
            pos, after_call = end + len(TOOL_CALL_END), call is not None
        return ToolSplit("".join(parts), tuple(calls))

    @classmethod
    def grammar(
        cls, tools: Sequence[Mapping[str, Any]], parallel: bool, token_id: TokenIdLookup, reasoning: bool
    ) -> str | None:
        schemas = [call_schema(tool) for tool in tools]
        schema = {"x-guidance": _JSON_STYLE, **(schemas[0] if len(schemas) == 1 else {"anyOf": schemas})}
        start, end = _lark_literal(TOOL_CALL_START, token_id), _lark_literal(TOOL_CALL_END, token_id)
        calls = "call (CALL_GAP call)*" if parallel else "call"
        return "\n".join(
            [
                f"start: {'reasoning ' if reasoning else ''}{calls}",
                f'call: {start} "\\n" call_json "\\n" {end}',
                f"call_json: %json {_json(schema)}",
                "CALL_GAP: /\\n+/",
            ]
        )


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _lark_literal(tag: str, token_id: TokenIdLookup) -> str:
    """A tag in a lark rule: its token by id when it is a special token (the way the model writes it, and no
    text spells it), else the quoted text."""
    token = token_id(tag)
    return f"<[{token}]>" if token is not None else _json(tag)


def _parse_call(block: str) -> ParsedToolCall | None:
    """The call in the text between the tags, or None when it is not `{"name": str, "arguments": object}`."""
    call = loads_strict(block)
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None
    arguments = arguments_json(call.get("arguments", {}))
    return None if arguments is None else ParsedToolCall(call["name"], arguments)


@hookimpl
def register_parsers(register: RegisterParser) -> None:
    for name in NAMES:
        register("reasoning", name, Ernie45ReasoningParser)
        register("tool_call", name, Ernie45ToolParser)
