"""The built-in `ernie45` reasoning and tool-call parsers: what they make of ERNIE's output, streamed at every
split position and in any chunks, malformed calls, several calls, and the grammar that enforces calls."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ernie_serve.gateway.parsers import ChoiceParser, ParsedOutput, ParsedToolCall, StreamedParse
from ernie_serve.plugins.ernie45 import Ernie45ReasoningParser, Ernie45ToolParser
from ernie_serve.tokenizer import MARKUP_TOKENS as MARKUP

TOOLS = [
    {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
    {"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}},
]


def parser(reasoning: bool = True, tools: bool = True, thinking: bool = True) -> ChoiceParser:
    return ChoiceParser(
        Ernie45ReasoningParser(thinking=thinking) if reasoning else None,
        Ernie45ToolParser(TOOLS) if tools else None,
    )


def streamed(make: ChoiceParser, chunks: list[str]) -> tuple[ParsedOutput, ParsedOutput]:
    """Feed the chunks as a stream does (the text so far, then once more finished): returns what the deltas
    add up to and the final parse, checking on the way that every result extends the one before."""
    sent = StreamedParse()
    reasoning, content, calls = "", "", []
    text, last = "", ParsedOutput("", "")
    for k, chunk in enumerate([*chunks, ""]):
        text += chunk
        out = make.parse(text, finished=k == len(chunks))
        assert out.reasoning.startswith(last.reasoning) and out.content.startswith(last.content), (text, out, last)
        assert out.tool_calls[: len(last.tool_calls)] == last.tool_calls
        r, c, new = sent.advance(out)
        reasoning, content, calls = reasoning + r, content + c, [*calls, *(call for _, call in new)]
        last = out
    return ParsedOutput(reasoning, content, tuple(calls)), last


def every_split(text: str, **kwargs: bool) -> ParsedOutput:
    """Stream `text` one character at a time (so every tag is cut at every position) and whole; both must
    give the same final parse, which the deltas add up to. Returns it."""
    whole = parser(**kwargs).parse(text, finished=True)
    for chunks in ([text], list(text)):
        deltas, final = streamed(parser(**kwargs), chunks)
        assert final == whole and deltas == whole, (chunks, deltas, whole)
    return whole


def call_block(name: str, arguments: dict) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n</tool_call>\n"


# -- reasoning ------------------------------------------------------------------------------------------


def test_thinking_answer_is_split_at_every_position() -> None:
    text = "The user greets me.\nI greet back.\n</think>\n\n<response>\nHello! 你好\n</response>\n"
    out = every_split(text, tools=False)
    assert out == ParsedOutput("The user greets me.\nI greet back.", "Hello! 你好")


@pytest.mark.parametrize(
    ("text", "reasoning", "content"),
    [
        ("<think>\nplan\n</think>\n\n<response>\nanswer\n</response>\n", "plan", "answer"),  # opening tag written
        ("plan\n</think>\nanswer", "plan", "answer"),  # no <response>
        ("plan that max_tokens cut", "plan that max_tokens cut", ""),  # never ended: all reasoning
        ("<response>\nno thinking\n</response>", "", "no thinking"),  # thinking skipped
        ("plan\n</think>\n\n<response>\nline 1\n\nline 2\n</response>\n", "plan", "line 1\n\nline 2"),
        ("a < b and a <= c\n</think>\n\n<response>\nx </respons y\n</response>", "a < b and a <= c", "x </respons y"),
        ("plan\n</think>\n\n<response>\ncut off", "plan", "cut off"),  # ended inside the response
        ("", "", ""),
    ],
)
def test_reasoning_shapes(text: str, reasoning: str, content: str) -> None:
    assert every_split(text, tools=False) == ParsedOutput(reasoning, content)


def test_thinking_off_makes_all_of_it_the_answer() -> None:
    assert every_split("<response>\nhi\n</response>", tools=False, thinking=False) == ParsedOutput("", "hi")
    assert every_split("just text", tools=False, thinking=False) == ParsedOutput("", "just text")


# -- tool calls -----------------------------------------------------------------------------------------


def test_reasoning_then_several_tool_calls() -> None:
    text = (
        "I need the weather twice.\n</think>\n\n"
        + call_block("get_weather", {"city": "Paris"})
        + call_block("get_weather", {"city": "北京"})
    )
    out = every_split(text)
    assert out.reasoning == "I need the weather twice." and out.content == ""
    assert out.tool_calls == (
        ParsedToolCall("get_weather", '{"city": "Paris"}'),
        ParsedToolCall("get_weather", '{"city": "北京"}'),
    )


def test_text_around_calls_is_content() -> None:
    text = "Let me check.\n" + call_block("add", {"a": 1}) + "Done?"
    out = every_split(text, reasoning=False)
    assert out == ParsedOutput("", "Let me check.Done?", (ParsedToolCall("add", '{"a": 1}'),))


@pytest.mark.parametrize(
    "block",
    [
        '<tool_call>\n{"name": "add", "arguments": {"a": 1}\n</tool_call>',  # unbalanced
        "<tool_call>\nnot json at all\n</tool_call>",
        '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
        '<tool_call>\n{"name": "add", "arguments": [1, 2]}\n</tool_call>',  # arguments not an object
        '<tool_call>\n{"name": "add", "arguments": {"a": NaN}}\n</tool_call>',  # not JSON
        "<tool_call>\n" + "[" * 100_000 + "\n</tool_call>",  # deeper than Python's parser goes
        '<tool_call>\n{"name": "add", "arguments": {"a": 1}}',  # never closed
    ],
)
def test_malformed_calls_stay_in_the_content(block: str) -> None:
    text = "before\n" + block
    out = parser(reasoning=False).parse(text, finished=True)
    assert out == ParsedOutput("", text)
    if len(block) < 1000:
        assert every_split(text, reasoning=False) == out


def test_a_malformed_call_between_good_ones() -> None:
    bad = "<tool_call>\n{oops}\n</tool_call>"
    text = call_block("add", {"a": 1}) + bad + "\n" + call_block("add", {"a": 2})
    out = every_split(text, reasoning=False)
    assert out.content == bad
    assert [c.arguments for c in out.tool_calls] == ['{"a": 1}', '{"a": 2}']


def test_arguments_given_as_json_text_are_kept() -> None:
    text = '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1}"}\n</tool_call>'
    assert parser(reasoning=False).parse(text, True).tool_calls == (ParsedToolCall("add", '{"a": 1}'),)


# -- any text, any chunks -------------------------------------------------------------------------------

# Pieces of ERNIE output and of near misses, so that random texts are full of whole and broken tags.
FRAGMENTS = [
    *MARKUP,
    *(tag[:k] for tag in MARKUP for k in (1, 2, len(tag) - 1)),
    "\n",
    "\n\n",
    " ",
    "plain words",
    "中文",
    '{"name": "add", "arguments": {"a": 1}}',
    '{"name": "add"',
    "}",
]


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=5), max_size=25),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
    reasoning=st.booleans(),
    thinking=st.booleans(),
)
def test_streaming_any_text_in_any_chunks_gives_the_final_message(
    pieces: list[str], cuts: list[int], reasoning: bool, thinking: bool
) -> None:
    text = "".join(pieces)
    bounds = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    whole = parser(reasoning=reasoning, thinking=thinking).parse(text, finished=True)
    deltas, final = streamed(parser(reasoning=reasoning, thinking=thinking), chunks)
    assert final == whole and deltas == whole


ANSWERS = st.text(st.characters(blacklist_characters="<>", blacklist_categories=("Cs",)), min_size=1, max_size=30)


@settings(max_examples=150, deadline=None)
@given(
    reasoning=ANSWERS.map(str.strip).filter(bool),
    answer=ANSWERS.map(str.strip).filter(bool),
    calls=st.lists(st.tuples(st.sampled_from(["add", "get_weather"]), st.dictionaries(ANSWERS, ANSWERS)), max_size=3),
)
def test_well_formed_output_never_leaks_markup(reasoning: str, answer: str, calls: list) -> None:
    if calls:
        text = f"{reasoning}\n</think>\n\n" + "".join(call_block(name, args) for name, args in calls)
    else:
        text = f"{reasoning}\n</think>\n\n<response>\n{answer}\n</response>\n"
    out = every_split(text)
    assert out.reasoning == reasoning.strip("\n")
    assert out.content == ("" if calls else answer.strip("\n"))
    assert [(c.name, json.loads(c.arguments)) for c in out.tool_calls] == calls
    assert not any(tag in out.reasoning + out.content for tag in MARKUP)


# -- the grammar ----------------------------------------------------------------------------------------


def test_grammar_uses_token_ids_of_single_token_tags_and_the_schemas() -> None:
    ids = {"<tool_call>": 7, "</tool_call>": 8}
    grammar = Ernie45ToolParser.grammar(TOOLS[:1], parallel=False, token_id=ids.get, reasoning=False)
    assert grammar is not None
    lines = grammar.splitlines()
    assert lines[0] == "start: call"
    assert lines[1] == 'call: <[7]> "\\n" call_json "\\n" <[8]>'
    schema = json.loads(lines[2].removeprefix("call_json: %json "))
    assert schema["properties"]["name"] == {"const": "get_weather"}
    assert schema["properties"]["arguments"] == {**TOOLS[0]["parameters"], "additionalProperties": False}
    several = Ernie45ToolParser.grammar(TOOLS, parallel=True, token_id=lambda _: None, reasoning=True)
    assert several is not None and several.startswith("start: reasoning call (CALL_GAP call)*\n")
    assert 'call: "<tool_call>" "\\n" call_json "\\n" "</tool_call>"' in several  # tags as text
    assert len(json.loads(several.splitlines()[2].removeprefix("call_json: %json "))["anyOf"]) == 2
