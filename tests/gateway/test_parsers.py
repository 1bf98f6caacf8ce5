"""Output-parser plumbing: finding parsers by kind and name (built-in and third-party, through entry points),
chaining them per choice, and what a stream sends."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from ernie_serve.core import plugins
from ernie_serve.core.plugins import UnknownPluginError
from ernie_serve.gateway.parsers import (
    REASONING,
    TOOL_CALL,
    ChoiceParser,
    ParsedOutput,
    ParsedToolCall,
    ReasoningParser,
    StreamedParse,
    call_schema,
    held_back,
    parser_class,
)
from ernie_serve.plugins.ernie45 import Ernie45ReasoningParser, Ernie45ToolParser

# The third-party parser of docs/plugins.md, verbatim.
DOCS_PLUGIN = '''
from ernie_serve import hookimpl
from ernie_serve.gateway.parsers import ReasoningParser, ReasoningSplit, held_back


class R1ReasoningParser(ReasoningParser):
    """DeepSeek-R1's output: `reasoning</think>answer` (its chat template opens the <think>)."""

    def split(self, text: str, finished: bool) -> ReasoningSplit:
        reasoning, tag, answer = text.partition("</think>")
        if not tag and not finished:  # hold back a tag cut off at the end until the next text settles it
            reasoning = reasoning[: len(reasoning) - held_back(reasoning, "</think>")]
        return ReasoningSplit(reasoning.strip(), answer.lstrip())


@hookimpl
def register_parsers(register):
    register("reasoning", "r1", R1ReasoningParser)
'''


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The docs' plugin installed as distribution `r1-parser` (a module and a *.dist-info on sys.path)."""
    monkeypatch.delenv("ERNIE_SERVE_PLUGINS", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "r1_parser.py").write_text(textwrap.dedent(DOCS_PLUGIN))
    info = tmp_path / "r1_parser-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: r1-parser\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[ernie_serve]\nr1 = r1_parser\n")
    plugins.reset_plugin_manager()
    yield
    plugins.reset_plugin_manager()
    sys.modules.pop("r1_parser", None)


def test_held_back() -> None:
    assert held_back("abc</th", "</think>") == 4
    assert held_back("abc<", "</think>", "<response>") == 1
    assert held_back("abc</think", "</think>") == 7  # a proper prefix only: the whole tag is not held
    assert held_back("abc</think>", "</think>") == 0
    assert held_back("", "</think>") == 0
    assert held_back("x\n<tool", "<tool_call>", "<think>") == 5


def test_builtin_parsers_under_both_names() -> None:
    for name in ("ernie45", "ernie-x1"):
        assert parser_class(REASONING, name) is Ernie45ReasoningParser
        assert parser_class(TOOL_CALL, name) is Ernie45ToolParser


def test_unknown_names_list_the_registered_ones() -> None:
    with pytest.raises(UnknownPluginError) as error:
        parser_class(REASONING, "deepseek")
    assert str(error.value) == (
        "unknown reasoning parser 'deepseek'; registered reasoning parsers: ernie-x1, ernie45 "
        "(see `ernie-serve plugins`)"
    )
    with pytest.raises(UnknownPluginError, match="unknown tool-call parser 'hermes'; registered tool-call parsers"):
        parser_class(TOOL_CALL, "hermes")


def test_third_party_parser_registers_like_a_builtin(third_party: None) -> None:
    registration = plugins.registry().parsers["reasoning:r1"]
    assert (registration.provider, registration.distribution) == ("r1", "r1-parser")
    cls = parser_class(REASONING, "r1")
    assert issubclass(cls, ReasoningParser) and cls.end_tag == "</think>"
    text = "Two and two.\n</think>\n\nFour."
    whole = ChoiceParser(cls(), None).parse(text, finished=True)
    assert whole == ParsedOutput("Two and two.", "Four.")
    for cut in range(len(text) + 1):  # the docs' parser streams correctly wherever the text is cut
        streaming, sent = ChoiceParser(cls(), None), StreamedParse()
        first = sent.advance(streaming.parse(text[:cut], finished=False))
        second = sent.advance(streaming.parse(text, finished=True))
        assert (first[0] + second[0], first[1] + second[1]) == (whole.reasoning, whole.content)


def test_a_registered_class_of_the_wrong_kind_is_refused(tmp_path: Path, third_party: None) -> None:
    (tmp_path / "r1_parser.py").write_text(
        textwrap.dedent(DOCS_PLUGIN).replace('register("reasoning"', 'register("tool_call"')
    )
    sys.modules.pop("r1_parser", None)
    plugins.reset_plugin_manager()
    with pytest.raises(UnknownPluginError, match="tool_call parser 'r1' .* is not a ToolParser subclass"):
        parser_class(TOOL_CALL, "r1")


def test_stream_sends_what_the_parse_gained() -> None:
    sent = StreamedParse()
    call = ParsedToolCall("f", "{}")
    assert sent.advance(ParsedOutput("think", "")) == ("think", "", [])
    assert sent.advance(ParsedOutput("thinking", "a")) == ("ing", "a", [])
    assert sent.advance(ParsedOutput("thinking", "a", (call,))) == ("", "", [(0, call)])
    assert sent.advance(ParsedOutput("thinking", "ab", (call, call))) == ("", "b", [(1, call)])


def test_reasoning_grammar_rule_matches_the_end_tag_by_id_or_as_text() -> None:
    by_id = ReasoningParser.grammar_rule({"</think>": 42}.get)
    assert by_id.splitlines()[0] == "reasoning: REASONING_TEXT <[42]> REASONING_GAP?"
    as_text = ReasoningParser.grammar_rule(lambda _: None)
    assert "reasoning_text[lazy]: /(?s:.*)<\\/think>/" in as_text.splitlines()


def test_a_forced_calls_arguments_take_only_the_declared_properties_unless_the_schema_says_otherwise() -> None:
    open_schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    arguments = call_schema({"name": "f", "parameters": open_schema})["properties"]["arguments"]
    assert arguments == {**open_schema, "additionalProperties": False}
    assert open_schema.get("additionalProperties") is None  # the request's own schema is not changed
    allowing = {**open_schema, "additionalProperties": True}
    assert call_schema({"name": "f", "parameters": allowing})["properties"]["arguments"] == allowing
    assert call_schema({"name": "f"})["properties"]["arguments"] == {"type": "object"}  # no properties: any object
