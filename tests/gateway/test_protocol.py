"""Request models: OpenAI's shapes, strict types, extensions, and refusal of what we do not support."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from ernie_serve.core.sampling_params import SamplingParamsError, StructuredOutputsParams
from ernie_serve.gateway.errors import APIError, error_param, from_validation_error
from ernie_serve.gateway.protocol import ChatCompletionRequest, CompletionRequest, unsupported_parameter


def chat(**fields: Any) -> ChatCompletionRequest:
    body = {"messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate_json(json.dumps(body))


def chat_error(**fields: Any) -> APIError:
    with pytest.raises(ValidationError) as info:
        chat(**fields)
    return from_validation_error(info.value)


def test_content_parts_join_and_developer_is_system() -> None:
    request = chat(
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None},
        ]
    )
    assert [m.for_template() for m in request.messages] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": ""},
    ]


@pytest.mark.parametrize(
    ("messages", "param", "message"),
    [
        (
            [{"role": "function", "content": "x"}],
            "messages.0.role",
            "messages.0.role: 'function' messages (OpenAI's deprecated functions API) are not supported: use 'tool'",
        ),
        (
            [{"role": "wizard", "content": "x"}],
            "messages.0.role",
            "messages.0.role: unknown role 'wizard': use 'system', 'user', 'assistant' or 'tool'",
        ),
        ([{"role": "tool"}], "messages.0", "messages.0: a 'tool' message needs content"),
        (
            [{"role": "user", "content": "x", "tool_calls": []}, {"role": "user", "content": "y", "tool_calls": [{}]}],
            "messages.1.tool_calls.0.id",
            "'messages.1.tool_calls.0.id' is required",
        ),
        (
            [
                {
                    "role": "user",
                    "content": "x",
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                }
            ],
            "messages.0",
            "messages.0: a 'user' message cannot have tool_calls: only assistant turns make them",
        ),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "messages.0.content.0",
            "messages.0.content.0: content part type 'image_url' is not supported: only 'text' parts are",
        ),
        ([{"role": "user"}], "messages.0", "messages.0: a 'user' message needs content"),
        ([], "messages", "messages: List should have at least 1 item after validation, not 0"),
    ],
)
def test_bad_messages_name_the_field(messages: list, param: str, message: str) -> None:
    error = chat_error(messages=messages)
    assert (error.status_code, error.type, error.param, error.message) == (
        400,
        "invalid_request_error",
        param,
        message,
    )


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"temperature": "hot"}, "temperature", "temperature: Input should be a valid number"),
        ({"temperature": -1}, "temperature", "temperature: Input should be greater than or equal to 0"),
        ({"top_p": 1.5}, "top_p", "top_p: Input should be less than or equal to 1"),
        ({"n": 0}, "n", "n: Input should be greater than or equal to 1"),
        ({"n": "2"}, "n", "n: Input should be a valid integer"),
        ({"max_tokens": 0}, "max_tokens", "max_tokens: Input should be greater than or equal to 1"),
        (
            {"max_completion_tokens": 0},
            "max_completion_tokens",
            "max_completion_tokens: Input should be greater than or equal to 1",
        ),
        ({"presence_penalty": 3}, "presence_penalty", "presence_penalty: Input should be less than or equal to 2"),
        ({"stream": "yes"}, "stream", "stream: Input should be a valid boolean"),
        ({"stop": [1]}, "stop", "stop: Input should be a valid string"),
        ({"stop": ""}, "stop", "stop: stop strings must not be empty"),
        (
            {"top_logprobs": 30, "logprobs": True},
            "top_logprobs",
            "top_logprobs: Input should be less than or equal to 20",
        ),
        ({"stream_options": {"include_usage": True}}, None, "stream_options is only allowed when stream is true"),
        ({"top_logprobs": 2}, None, "top_logprobs needs logprobs set to true"),
    ],
)
def test_wrong_types_and_ranges_are_400s(fields: dict, param: str | None, message: str) -> None:
    error = chat_error(**fields)
    assert (error.status_code, error.type, error.param, error.message) == (
        400,
        "invalid_request_error",
        param,
        message,
    )


def test_unknown_fields_are_kept_for_plugins_and_otherwise_ignored() -> None:
    request = chat(web_search={"references": []}, metadata={"x": 1}, store=False)
    assert request.model_extra == {"web_search": {"references": []}, "metadata": {"x": 1}, "store": False}
    assert unsupported_parameter(request) is None


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"logit_bias": {"5": 10}}, "logit_bias", "'logit_bias' is not supported yet by ernie-serve"),
        ({"modalities": ["text", "audio"]}, "modalities", "only the 'text' modality is supported"),
    ],
)
def test_unsupported_parameters_are_named(fields: dict, param: str, message: str) -> None:
    assert unsupported_parameter(chat(**fields)) == (param, message)


@pytest.mark.parametrize(
    "fields",
    [{"tools": []}, {"tool_choice": "none"}, {"response_format": {"type": "text"}}, {"logit_bias": {}}],
)
def test_neutral_values_of_unsupported_parameters_pass(fields: dict) -> None:
    assert unsupported_parameter(chat(**fields)) is None


def test_chat_sampling_params_mapping() -> None:
    params = chat(
        max_tokens=5,
        max_completion_tokens=7,
        logprobs=True,
        top_logprobs=3,
        stop="x",
        top_k=4,
        min_p=0.1,
        repetition_penalty=1.2,
        min_tokens=2,
        ignore_eos=True,
        stop_token_ids=[9],
        seed=3,
    ).sampling_params()
    assert params.max_tokens == 7  # max_completion_tokens wins
    assert params.logprobs == 3 and params.stop == ["x"] and params.stop_token_ids == [9]
    assert (params.top_k, params.min_p, params.repetition_penalty, params.min_tokens) == (4, 0.1, 1.2, 2)
    assert params.ignore_eos and params.seed == 3
    assert chat().sampling_params().max_tokens is None  # chat default: up to the context limit
    assert chat(logprobs=True).sampling_params().logprobs == 0
    assert chat().sampling_params().logprobs is None


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a", ["a"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2], [[1, 2]]),
        ([[1], [2, 3]], [[1], [2, 3]]),
    ],
)
def test_completion_prompt_shapes(prompt: Any, expected: list[Any]) -> None:
    request = CompletionRequest.model_validate_json(json.dumps({"prompt": prompt}))
    assert request.prompts() == expected
    assert request.sampling_params().max_tokens == 16  # OpenAI's completions default


@pytest.mark.parametrize("prompt", [[], [1, "a"], [[]], [True], 3, None])
def test_bad_completion_prompts(prompt: Any) -> None:
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate_json(json.dumps({"prompt": prompt}))
    error = from_validation_error(info.value)
    assert (error.param, error.message) == (
        "prompt",
        "prompt: prompt must be a string, a list of strings, a list of token ids or a list of token-id lists, "
        "and not empty",
    )


def test_completion_missing_prompt_and_echo_with_logprobs() -> None:
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate_json("{}")
    error = from_validation_error(info.value)
    assert (error.param, error.message) == ("prompt", "'prompt' is required")
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate_json('{"prompt": "a", "echo": true, "logprobs": 1}')
    error = from_validation_error(info.value)
    assert (error.param, error.message) == (
        None,
        "echo with logprobs is not supported yet (prompt logprobs are not computed)",
    )
    suffix = CompletionRequest.model_validate_json('{"prompt": "a", "suffix": "z"}')
    assert unsupported_parameter(suffix) == ("suffix", "'suffix' is not supported yet by ernie-serve")


def test_error_param_drops_union_labels() -> None:
    assert error_param(("messages", 0, "content", "str")) == "messages.0.content"
    assert error_param(("stop", "list[str]", 1)) == "stop.1"
    assert error_param(("messages", 0, "function-after[_known_role(), str]")) == "messages.0"
    assert error_param(()) is None


def test_malformed_json_and_non_objects() -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate_json('{"messages": ')
    error = from_validation_error(info.value)
    assert error.param is None and error.message.startswith("the request body is not valid JSON: ")
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate_json("[1]")
    error = from_validation_error(info.value)
    assert (error.param, error.message) == (None, "the request body must be a JSON object")


def test_tool_turns_reach_the_template_with_arguments_as_objects() -> None:
    request = chat(
        messages=[
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "w", "arguments": '{"city": "Paris"}'}},
                    {"id": "c2", "type": "function", "function": {"name": "w", "arguments": "not json"}},
                ],
            },
            {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
        ]
    )
    turns = [m.for_template() for m in request.messages]
    assert turns[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "w", "arguments": {"city": "Paris"}}},
            {"id": "c2", "type": "function", "function": {"name": "w", "arguments": "not json"}},
        ],
    }
    assert turns[2] == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f"}},
                    {"type": "function", "function": {"name": "f"}},
                ]
            },
            "tools: function names must be unique",
        ),
        (
            {"chat_template_kwargs": {"messages": [], "enable_thinking": True}},
            "chat_template_kwargs may not set messages: they are request fields",
        ),
        ({"tool_choice": "sometimes"}, None),
        ({"tools": [{"type": "retrieval"}]}, None),
        ({"reasoning_max_tokens": 0}, "reasoning_max_tokens: Input should be greater than or equal to 1"),
    ],
)
def test_bad_tool_fields_are_400s(fields: dict, message: str | None) -> None:
    error = chat_error(**fields)
    assert (error.status_code, error.type) == (400, "invalid_request_error")
    if message is not None:
        assert error.message == message


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, None),
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, StructuredOutputsParams(json_object=True)),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}},
            StructuredOutputsParams(json=SCHEMA),
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "any"}}},
            StructuredOutputsParams(json_object=True),
        ),
        ({"structured_outputs": {"json": SCHEMA}}, StructuredOutputsParams(json=SCHEMA)),
        ({"structured_outputs": {"choice": ["a", "b"]}}, StructuredOutputsParams(choice=["a", "b"])),
        ({"structured_outputs": {"grammar": "start: A"}}, StructuredOutputsParams(grammar="start: A")),
        ({"guided_regex": "[0-9]+"}, StructuredOutputsParams(regex="[0-9]+")),
        ({"guided_json": SCHEMA}, StructuredOutputsParams(json=SCHEMA)),
    ],
)
def test_structured_output_fields_become_one_spec(fields: dict, expected: StructuredOutputsParams | None) -> None:
    assert chat(**fields).sampling_params().structured_outputs == expected
    body = {"prompt": "p", **fields}
    assert CompletionRequest.model_validate_json(json.dumps(body)).sampling_params().structured_outputs == expected


def test_unknown_keys_in_structured_outputs_are_ignored() -> None:
    spec = chat(structured_outputs={"json_object": True, "": [1], "extra": None}).sampling_params().structured_outputs
    assert spec == StructuredOutputsParams(json_object=True)


def test_two_constraints_at_once_are_refused() -> None:
    error = chat_error(response_format={"type": "json_object"}, guided_choice=["a"])
    assert error.message == "response_format and guided_choice both constrain the output: use one of them"
    with pytest.raises(SamplingParamsError, match="set exactly one of") as info:
        chat(structured_outputs={"regex": "a", "grammar": "start: A"}).sampling_params()
    assert info.value.param == "structured_outputs"
