"""Reasoning and tool calls end to end: the built-in demo model (random weights, ERNIE's tags as special tokens)
behind a real server with `--reasoning-parser ernie45 --tool-call-parser ernie-x1 --enable-auto-tool-choice`,
spoken to with the official `openai` client, streamed and not.

A random model writes ERNIE's format only when made to: tool_choice "required" and named functions are
constrained by the gateway's own grammar (what this feature promises), and the tests that need a given answer
(a reasoning split, several calls, a malformed call) force it with a `structured_outputs` grammar that spells it
out, tags as their token ids: the text then goes through the detokenizer and the parsers exactly as a real
model's would.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import jsonschema
import openai
import pytest

from ernie_serve.demo import demo_checkpoint_dir
from ernie_serve.tokenizer import MARKUP_TOKENS, Tokenizer

MODEL = "demo"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "北京"]}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": CITY_SCHEMA}}
ADD_SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}, "b": {"type": "boolean"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
ADD = {"type": "function", "function": {"name": "add", "description": "adds", "parameters": ADD_SCHEMA}}
SCHEMAS = {"get_weather": CITY_SCHEMA, "add": ADD_SCHEMA}
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def tool_server(launch: Callable[..., Any]) -> Iterator[Any]:
    server = launch(
        "demo",
        "--served-model-name", MODEL,
        "--reasoning-parser", "ernie45",
        "--tool-call-parser", "ernie-x1",
        "--enable-auto-tool-choice",
    )  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(tool_server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tool_server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def demo_tokenizer(tool_server: Any) -> Tokenizer:
    return Tokenizer.from_pretrained(demo_checkpoint_dir())  # built by the server already


@pytest.fixture(scope="module")
def spell(demo_tokenizer: Tokenizer) -> Callable[..., dict[str, Any]]:
    """`spell("text", "</think>", ...)` -> extra_body forcing exactly that output: markup as its token, the rest
    as text."""

    def make(*parts: str) -> dict[str, Any]:
        items = []
        for part in parts:
            token = demo_tokenizer.token_to_id(part)
            items.append(f"<[{token}]>" if token is not None and part.startswith("<") else json.dumps(part))
        return {"structured_outputs": {"grammar": "start: " + " ".join(items)}}

    return make


def collect(stream: Any, index: int = 0) -> dict[str, Any]:
    """A streamed choice put together: reasoning, content, tool calls by index, finish reason."""
    out: dict[str, Any] = {"reasoning": "", "reasoning_content": "", "content": "", "calls": {}, "finish": None}
    for chunk in stream:
        for choice in chunk.choices:
            if choice.index != index:
                continue
            delta = choice.delta
            extra = delta.model_extra or {}
            out["reasoning"] += extra.get("reasoning") or ""
            out["reasoning_content"] += extra.get("reasoning_content") or ""
            out["content"] += delta.content or ""
            for call in delta.tool_calls or []:
                assert call.index not in out["calls"], "a call is sent whole, once"
                out["calls"][call.index] = (call.id, call.function.name, call.function.arguments)
            out["finish"] = choice.finish_reason or out["finish"]
    return out


def check_calls(calls: list[Any], names: set[str]) -> None:
    """Every call names an allowed function, has a fresh id and arguments that follow its schema."""
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert len({call.id for call in calls}) == len(calls)


def test_reasoning_is_split_streamed_and_not(client: openai.OpenAI, spell: Callable[..., dict[str, Any]]) -> None:
    body = spell("The user asks about weather.\n", "</think>", "\n\n", "<response>", "\nIt is sunny.\n", "</response>")
    reply = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=60, extra_body=body)
    message = reply.choices[0].message
    extra = message.model_extra or {}
    assert (extra["reasoning_content"], extra["reasoning"]) == ("The user asks about weather.",) * 2
    assert message.content == "It is sunny." and not message.tool_calls
    assert reply.choices[0].finish_reason == "stop"

    streamed = collect(
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=60, extra_body=body, stream=True)
    )
    assert streamed["reasoning"] == streamed["reasoning_content"] == "The user asks about weather."
    assert (streamed["content"], streamed["calls"], streamed["finish"]) == ("It is sunny.", {}, "stop")


def test_auto_tool_choice_finds_several_calls_after_reasoning(
    client: openai.OpenAI, spell: Callable[..., dict[str, Any]]
) -> None:
    first, second = (
        '\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n',
        '\n{"name": "add", "arguments": {"a": 1, "b": true}}\n',
    )
    body = spell(
        "Two calls.\n",
        "</think>",
        "\n\n",
        "<tool_call>",
        first,
        "</tool_call>",
        "\n",
        "<tool_call>",
        second,
        "</tool_call>",
    )
    kwargs: dict[str, Any] = dict(model=MODEL, messages=ASK, tools=[WEATHER, ADD], max_tokens=100, extra_body=body)
    reply = client.chat.completions.create(**kwargs)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert (choice.message.model_extra or {})["reasoning_content"] == "Two calls."
    calls = choice.message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("add", {"a": 1, "b": True}),
    ]
    check_calls(calls, {"get_weather", "add"})

    streamed = collect(client.chat.completions.create(**kwargs, stream=True))
    assert streamed["finish"] == "tool_calls" and streamed["content"] == ""
    assert [(name, args) for _, name, args in streamed["calls"].values()] == [
        (c.function.name, c.function.arguments) for c in calls
    ]
    assert sorted(streamed["calls"]) == [0, 1]


def test_malformed_tool_json_is_returned_as_content(
    client: openai.OpenAI, spell: Callable[..., dict[str, Any]]
) -> None:
    body = spell("<tool_call>", '\n{"name": "get_weather", "arguments": {"city": }\n', "</tool_call>")
    kwargs: dict[str, Any] = dict(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=60, extra_body=body)
    kwargs["extra_body"] = {**body, **NO_THINKING}
    reply = client.chat.completions.create(**kwargs)
    choice = reply.choices[0]
    assert choice.message.content == '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>'
    assert not choice.message.tool_calls and choice.finish_reason == "stop"
    streamed = collect(client.chat.completions.create(**kwargs, stream=True))
    assert (streamed["content"], streamed["calls"]) == (choice.message.content, {})


@pytest.mark.parametrize("stream", [False, True])
def test_required_returns_a_well_formed_call(client: openai.OpenAI, stream: bool) -> None:
    kwargs: dict[str, Any] = dict(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER, ADD],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=120,
        temperature=0,
        extra_body=NO_THINKING,
    )
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        assert choice.finish_reason == "tool_calls"
        assert len(choice.message.tool_calls or []) == 1
        check_calls(choice.message.tool_calls or [], {"get_weather", "add"})
        return
    streamed = collect(client.chat.completions.create(**kwargs, stream=True))
    assert streamed["finish"] == "tool_calls" and list(streamed["calls"]) == [0]
    _, name, arguments = streamed["calls"][0]
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_required_with_parallel_calls_returns_only_well_formed_calls(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, ADD], tool_choice="required", max_tokens=300, extra_body=NO_THINKING
    )
    choice = reply.choices[0]
    check_calls(choice.message.tool_calls or [], {"get_weather", "add"})
    assert choice.finish_reason in ("tool_calls", "length")


def test_each_of_n_choices_gets_its_own_calls(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER, ADD],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=120,
        temperature=1.0,
        seed=5,
        n=2,
        extra_body=NO_THINKING,
    )
    reply = client.chat.completions.create(**kwargs)
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls"
        check_calls(choice.message.tool_calls or [], {"get_weather", "add"})
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    for choice in reply.choices:  # the same seed, the same calls; each choice's calls are indexed from 0
        streamed = collect(chunks, choice.index)
        calls = choice.message.tool_calls or []
        assert streamed["finish"] == "tool_calls"
        assert list(streamed["calls"].values())[0][1:] == (calls[0].function.name, calls[0].function.arguments)
        assert list(streamed["calls"]) == [0]


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_function_is_the_one_called(client: openai.OpenAI, stream: bool) -> None:
    kwargs: dict[str, Any] = dict(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER, ADD],
        tool_choice={"type": "function", "function": {"name": "add"}},
        parallel_tool_calls=False,
        max_tokens=120,
        extra_body=NO_THINKING,
    )
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        assert choice.finish_reason == "tool_calls"
        check_calls(choice.message.tool_calls or [], {"add"})
        return
    streamed = collect(client.chat.completions.create(**kwargs, stream=True))
    assert streamed["finish"] == "tool_calls" and [name for _, name, _ in streamed["calls"].values()] == ["add"]


def test_required_while_thinking_reasons_within_the_budget_then_calls(
    client: openai.OpenAI, demo_tokenizer: Tokenizer
) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=120,
        temperature=0,
        extra_body={"reasoning_max_tokens": 5, "chat_template_kwargs": {"enable_thinking": True}},
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    check_calls(choice.message.tool_calls or [], {"get_weather"})
    reasoning = (choice.message.model_extra or {})["reasoning_content"] or ""
    assert not any(tag in reasoning for tag in MARKUP_TOKENS) and choice.message.content is None
    # the budget: 5 tokens of reasoning at most, then </think> and the call
    assert reply.usage is not None and len(demo_tokenizer.encode(reasoning)) <= 5


def test_chat_template_kwargs_reach_the_template(client: openai.OpenAI, demo_tokenizer: Tokenizer) -> None:
    def prompt_tokens(**extra: Any) -> int:
        reply = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1, extra_body=extra)
        assert reply.usage is not None
        return reply.usage.prompt_tokens

    plain = prompt_tokens()
    assert prompt_tokens(chat_template_kwargs={"enable_thinking": True}) == plain + 2  # <think> \n
    assert prompt_tokens(**NO_THINKING) == plain + len(demo_tokenizer.encode("<think>\n\n</think>\n\n"))
    with_tools = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=1, tools=[WEATHER], tool_choice="none"
    )
    assert with_tools.usage is not None and with_tools.usage.prompt_tokens > plain + 20  # the tool's schema


def test_tool_calls_and_results_in_the_history(client: openai.OpenAI) -> None:
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'},
    ]
    reply = client.chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER], tool_choice="none", max_tokens=4
    )
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert not reply.choices[0].message.tool_calls  # "none": nothing is parsed


@pytest.mark.parametrize(
    ("extra", "param", "message"),
    [
        (
            {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "tool_choice names function 'nope', not among tools: get_weather",
        ),
        ({"tools": [{"type": "function"}]}, "tools.0.function", "'tools.0.function' is required"),
    ],
)
def test_tool_mistakes_are_400s(client: openai.OpenAI, extra: dict, param: str, message: str) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, **{"tools": [WEATHER], **extra})
    body = error.value.body
    assert isinstance(body, dict) and (body["param"], body["message"]) == (param, message)


def test_a_schema_the_grammar_engine_cannot_compile_is_a_400_naming_tools(client: openai.OpenAI) -> None:
    odd = {"type": "object", "properties": {"when": {"type": "string", "format": "no-such-format"}}}
    tool = {"type": "function", "function": {"name": "odd", "parameters": odd}}
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, tools=[tool], tool_choice="required")
    body = error.value.body
    assert isinstance(body, dict) and body["param"] == "tools" and "no-such-format" in body["message"]
    both = {"structured_outputs": {"regex": "a+"}}
    with pytest.raises(openai.BadRequestError, match="cannot be combined with a structured output"):
        client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=4, tools=[WEATHER], tool_choice="required", extra_body=both
        )


def test_auto_needs_the_server_flag(server: Any) -> None:
    plain = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="--enable-auto-tool-choice"):
        plain.chat.completions.create(model="ernie-tiny", messages=ASK, max_tokens=4, tools=[WEATHER])


def test_unknown_parser_names_stop_the_server_with_the_registered_ones(
    launch: Callable[..., Any], checkpoint: Any
) -> None:
    server = launch(checkpoint, "--tool-call-parser", "hermes", wait=False)
    assert server.wait_exit() != 0
    assert (
        "ernie-serve: error: unknown tool-call parser 'hermes'; registered tool-call parsers: ernie-x1, ernie45 "
        "(see `ernie-serve plugins`)" in server.lines()
    )
    server = launch(checkpoint, "--enable-auto-tool-choice", wait=False)
    assert server.wait_exit() != 0
    assert any("--enable-auto-tool-choice needs --tool-call-parser" in line for line in server.lines())
