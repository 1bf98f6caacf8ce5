"""tool_choice, chat_template_kwargs and reasoning_max_tokens: the 400s, the template variables, the grammar and
the reasoning budget a chat request gets."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ernie_serve.core.sampling_params import SamplingParams
from ernie_serve.gateway.chat_plan import ChatPlan, ReasoningBudget, ServerParsers, plan_chat
from ernie_serve.gateway.errors import APIError
from ernie_serve.gateway.parsers import ToolParser, ToolSplit
from ernie_serve.gateway.protocol import ChatCompletionRequest
from ernie_serve.gateway.settings import ServerSettings
from ernie_serve.plugins.ernie45 import Ernie45ReasoningParser, Ernie45ToolParser

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
HI = [{"role": "user", "content": "hi"}]
TAGS = {"<tool_call>": 100, "</tool_call>": 101, "</think>": 102}

PLAIN = ServerParsers()
TOOLS = ServerParsers(tool_call=Ernie45ToolParser)
AUTO = ServerParsers(tool_call=Ernie45ToolParser, auto_tool_choice=True)
THINKING = ServerParsers(reasoning=Ernie45ReasoningParser, tool_call=Ernie45ToolParser, auto_tool_choice=True)


def plan(server: ServerParsers, **fields: Any) -> ChatPlan:
    request = ChatCompletionRequest.model_validate({"messages": HI, **fields})
    return plan_chat(request, server, TAGS.get)


def refusal(server: ServerParsers, **fields: Any) -> tuple[str | None, str]:
    with pytest.raises(APIError) as error:
        plan(server, **fields)
    assert error.value.status_code == 400
    return error.value.param, error.value.message


def test_no_tools_no_parsing() -> None:
    p = plan(PLAIN)
    assert (p.parses, p.grammar, p.template_variables) == (False, None, {})


def test_tools_reach_the_template_even_with_tool_choice_none() -> None:
    p = plan(AUTO, tools=[WEATHER], tool_choice="none", chat_template_kwargs={"enable_thinking": False})
    assert p.template_variables == {"enable_thinking": False, "tools": [WEATHER]}
    assert p.tool_parser is None and p.grammar is None


def test_auto_is_the_default_with_tools_and_needs_the_server_flag() -> None:
    assert plan(AUTO, tools=[WEATHER]).tool_parser is Ernie45ToolParser
    for server in (PLAIN, TOOLS):
        assert refusal(server, tools=[WEATHER]) == (
            "tool_choice",
            '"auto" tool choice needs a server started with --enable-auto-tool-choice and --tool-call-parser',
        )


def test_required_and_named_are_enforced_by_a_grammar_without_a_parser_flag() -> None:
    required = plan(PLAIN, tools=[WEATHER, ADD], tool_choice="required")
    assert required.tool_parser is Ernie45ToolParser and required.grammar is not None
    assert required.grammar.startswith("start: call (CALL_GAP call)*\ncall: <[100]>")
    assert '"const": "get_weather"' in required.grammar and '"const": "add"' in required.grammar
    named = plan(PLAIN, tools=[WEATHER, ADD], tool_choice={"type": "function", "function": {"name": "add"}})
    assert named.grammar is not None and '"const": "get_weather"' not in named.grammar
    single = plan(PLAIN, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    assert single.grammar is not None and single.grammar.startswith("start: call\n")


def test_with_thinking_the_grammar_lets_the_model_reason_first() -> None:
    p = plan(THINKING, tools=[WEATHER], tool_choice="required")
    assert p.grammar is not None and p.grammar.startswith("start: reasoning call")
    assert "reasoning: REASONING_TEXT <[102]> REASONING_GAP?" in p.grammar
    off = plan(THINKING, tools=[WEATHER], tool_choice="required", chat_template_kwargs={"enable_thinking": False})
    assert off.grammar is not None and off.grammar.startswith("start: call")


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"tool_choice": "required"}, "tool_choice", "tool_choice 'required' or a named function needs tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "tool_choice names function 'nope', not among tools: get_weather",
        ),
        (
            {"reasoning_max_tokens": 10},
            "reasoning_max_tokens",
            "reasoning_max_tokens needs a server started with --reasoning-parser",
        ),
    ],
)
def test_inconsistent_requests_are_400s(fields: dict, param: str, message: str) -> None:
    assert refusal(AUTO, **fields) == (param, message)


class TextOnlyToolParser(ToolParser):
    """A tool-call parser that can read calls but writes no grammar."""

    def split(self, text: str, finished: bool) -> ToolSplit:
        return ToolSplit(text)


def test_a_parser_without_a_grammar_cannot_force_calls() -> None:
    server = ServerParsers(tool_call=TextOnlyToolParser, auto_tool_choice=True)
    assert plan(server, tools=[WEATHER]).tool_parser is TextOnlyToolParser
    assert refusal(server, tools=[WEATHER], tool_choice="required") == (
        "tool_choice",
        "the server's tool-call parser cannot enforce tool_choice 'required'",
    )


def test_grammar_and_budget_go_into_the_sampling_params() -> None:
    p = plan(THINKING, tools=[WEATHER], tool_choice="required", reasoning_max_tokens=3)
    params = p.constrain(SamplingParams(), lambda tag: [TAGS[tag]])
    assert params.structured_outputs is not None and params.structured_outputs.grammar == p.grammar
    (factory,) = params.logits_processors
    budget = factory()
    assert isinstance(budget, ReasoningBudget) and (budget.budget, budget.end_ids) == (3, [102])
    assert factory() is not budget  # one per sequence
    assert (
        plan(THINKING, reasoning_max_tokens=3, chat_template_kwargs={"enable_thinking": False}).reasoning_budget is None
    )


def test_reasoning_budget_forces_the_end_tag_then_lets_go() -> None:
    budget = ReasoningBudget(2, [7, 8])
    row = torch.full((1,), -1, dtype=torch.int32)
    for token in (3, 4):
        assert budget.fill_bitmask(row) is False
        budget.accept_token(token)
    for token in (7, 8):  # forced, one token per step
        row.fill_(-1)
        assert budget.fill_bitmask(row) is True and row.tolist() == [1 << token]
        budget.accept_token(token)
    assert budget.fill_bitmask(row) is False  # the answer is free


def test_reasoning_budget_does_nothing_once_the_model_ends_reasoning_itself() -> None:
    budget = ReasoningBudget(3, [9])
    for token in (1, 9, 1, 1, 1):
        budget.accept_token(token)
    assert budget.fill_bitmask(torch.full((1,), -1, dtype=torch.int32)) is False


def test_server_settings_resolve_parsers_and_check_the_auto_flag() -> None:
    server = ServerParsers.from_settings(
        ServerSettings(reasoning_parser="ernie-x1", tool_call_parser="ernie45", enable_auto_tool_choice=True)
    )
    assert server == THINKING
    with pytest.raises(ValueError, match="--enable-auto-tool-choice needs --tool-call-parser"):
        ServerSettings(enable_auto_tool_choice=True)
