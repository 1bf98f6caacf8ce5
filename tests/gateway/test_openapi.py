"""`/openapi.json`: a valid OpenAPI 3.1 document, covering every route, whose request schemas are the request
models (and reject what they reject), whose response schemas use the OpenAI client's field names and types,
and that real responses of a running server conform to."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import openai.types
import openai.types.chat
import openai.types.chat.chat_completion
import openai.types.chat.chat_completion_chunk
import pytest
import schemathesis
from openapi_spec_validator import validate
from pydantic import BaseModel
from starlette.routing import Route

from ernie_serve import __version__
from ernie_serve.async_engine import AsyncEngine
from ernie_serve.core.config import EngineSettings
from ernie_serve.gateway.app import build_app
from ernie_serve.gateway.openapi import openapi_document
from ernie_serve.gateway.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    StreamOptions,
    TextContentPart,
)
from ernie_serve.gateway.settings import ServerSettings

MODEL = "ernie-tiny"


def schemas(api_key: bool = False) -> dict[str, Any]:
    return openapi_document(api_key=api_key, version=__version__)["components"]["schemas"]


@pytest.mark.parametrize("api_key", [False, True])
def test_document_is_valid_openapi_3_1(api_key: bool) -> None:
    document = openapi_document(api_key=api_key, version=__version__)
    validate(document)  # raises on any violation of the OpenAPI 3.1 schema
    assert document["openapi"] == "3.1.0"
    assert ("security" in document) is api_key
    statuses = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert ("401" in statuses) is api_key
    assert document["paths"]["/health"]["get"]["security"] == []  # health checks never need a key


def _app(checkpoint: Path, api_keys: list[str]) -> Any:
    """The gateway in process, without starting its engine (no lifespan runs under ASGITransport)."""
    engine = AsyncEngine(EngineSettings(model=str(checkpoint)))
    return build_app(engine, ServerSettings(api_key=api_keys), model_name=MODEL, use_plugins=False)


def test_every_route_is_documented(checkpoint: Path) -> None:
    app = _app(checkpoint, [])
    served = {
        (method.lower(), route.path.replace(":path}", "}"))
        for route in app.routes
        if isinstance(route, Route) and route.path != "/openapi.json"
        for method in (route.methods or ()) - {"HEAD"}
    }
    documented = {(m, p) for p, item in openapi_document(api_key=False, version="")["paths"].items() for m in item}
    assert served == documented


def test_openapi_json_is_behind_the_api_key(checkpoint: Path) -> None:
    app = _app(checkpoint, ["k"])

    async def run() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            refused = await client.get("/openapi.json")
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "invalid_api_key"
            served = await client.get("/openapi.json", headers={"Authorization": "Bearer k"})
            assert served.status_code == 200
            assert served.json() == openapi_document(api_key=True, version=__version__)

    asyncio.run(run())


@pytest.mark.parametrize(
    "model",
    [ChatCompletionRequest, CompletionRequest, ChatMessage, TextContentPart, StreamOptions],
    ids=lambda m: m.__name__,
)
def test_request_schemas_are_the_models(model: type[BaseModel]) -> None:
    """Every field is documented under its name, and only those; the generated schema of each field is kept
    unless a documented rule (in openapi.py) replaces it."""
    own = model.model_json_schema(ref_template="#/components/schemas/{model}")
    documented = schemas()[model.__name__]
    assert set(documented["properties"]) == set(model.model_fields)
    assert set(own.get("required", [])) <= set(documented.get("required", []))
    changed = {name for name in own["properties"] if own["properties"][name] != documented["properties"][name]}
    expected_changes = {
        "ChatCompletionRequest": {"stop", "stop_token_ids"},
        "CompletionRequest": {"prompt", "stop", "stop_token_ids"},
        "ChatMessage": {"role"},
        "TextContentPart": {"type", "text"},
    }
    assert changed == expected_changes.get(model.__name__, set())


HI = [{"role": "user", "content": "hi"}]

# Bodies that the rules written into the schema exclude; the server must refuse each with a 400.
EXCLUDED_BY_RULES = [
    ("/v1/chat/completions", {"messages": [{"role": "function", "content": "x"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "tool"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "bot", "content": "x"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": None}, *HI]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}),
    ("/v1/chat/completions", {"messages": HI, "stop": ""}),
    ("/v1/chat/completions", {"messages": HI, "stop": ["a", ""]}),
    ("/v1/chat/completions", {"messages": HI, "stop_token_ids": [-1]}),
    ("/v1/completions", {"prompt": ""}),
    ("/v1/completions", {"prompt": []}),
    ("/v1/completions", {"prompt": [[]]}),
    ("/v1/completions", {"prompt": ["a", ""]}),
    ("/v1/completions", {"prompt": [1, "a"]}),
    ("/v1/completions", {"prompt": [-1]}),
    ("/v1/completions", {"prompt": [[1], [-1]]}),
    ("/v1/completions", {"prompt": "a", "stop": [""]}),
]


@pytest.mark.parametrize(("path", "body"), EXCLUDED_BY_RULES)
def test_what_the_schema_excludes_the_server_refuses(server: Any, path: str, body: dict[str, Any]) -> None:
    response = httpx.post(f"{server.base_url}{path}", json={**body, "max_tokens": 1}, timeout=60)
    assert response.status_code == 400, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_what_the_rules_allow_the_server_accepts(server: Any) -> None:
    """An assistant turn without content, text parts, token-id prompts: inside the rules, and served."""
    messages = [
        {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "again"},
    ]
    chat = httpx.post(
        f"{server.base_url}/v1/chat/completions", json={"messages": messages, "max_tokens": 1}, timeout=60
    )
    assert chat.status_code == 200, chat.text
    completion = httpx.post(
        f"{server.base_url}/v1/completions", json={"prompt": [[1, 2], [3]], "stop": ["x"], "max_tokens": 1}, timeout=60
    )
    assert completion.status_code == 200, completion.text


def _json_types(schema: dict[str, Any], defs: dict[str, Any]) -> set[str]:
    """The JSON types a property schema allows (a reference or a const counts by what it points to)."""
    if "$ref" in schema:
        return _json_types(defs[schema["$ref"].rsplit("/", 1)[1]], defs)
    if "anyOf" in schema or "oneOf" in schema:
        return set().union(*(_json_types(s, defs) for s in schema.get("anyOf", schema.get("oneOf", []))))
    if "type" in schema:
        return {schema["type"]} if isinstance(schema["type"], str) else set(schema["type"])
    if "const" in schema:
        return {type(schema["const"]).__name__.replace("str", "string")}
    if "enum" in schema:
        return {"string"}
    return {"any"}


OPENAI_TYPES: list[tuple[str, type[BaseModel]]] = [
    ("ChatCompletionResponse", openai.types.chat.ChatCompletion),
    ("ChatCompletionChoice", openai.types.chat.chat_completion.Choice),
    ("ChatResponseMessage", openai.types.chat.ChatCompletionMessage),
    ("ChatCompletionChunk", openai.types.chat.ChatCompletionChunk),
    ("ChatCompletionStreamChoice", openai.types.chat.chat_completion_chunk.Choice),
    ("DeltaMessage", openai.types.chat.chat_completion_chunk.ChoiceDelta),
    ("CompletionResponse", openai.types.Completion),
    ("CompletionChoice", openai.types.CompletionChoice),
    ("UsageInfo", openai.types.CompletionUsage),
    ("ModelCard", openai.types.Model),
]


# Fields our models allow to be null where the OpenAI client's are not. A non-streamed choice is written only
# once it has finished, so its finish_reason is always set; the model's type is looser than what is sent.
NULLABLE_HERE_ONLY = {("ChatCompletionChoice", "finish_reason"), ("CompletionChoice", "finish_reason")}


@pytest.mark.parametrize(("ours", "theirs"), OPENAI_TYPES, ids=[o for o, _ in OPENAI_TYPES])
def test_response_schemas_use_the_openai_clients_names_and_types(ours: str, theirs: type[BaseModel]) -> None:
    """Every field the OpenAI client requires is one we always send, and every field we share with it has a
    JSON type the client accepts (the rest, such as vLLM's `stop_reason`, are extensions it keeps as extras)."""
    defs = schemas()
    their_schema = theirs.model_json_schema()
    their_defs = their_schema.get("$defs", {})
    our_schema = defs[ours]
    their_required = set(their_schema.get("required", []))
    assert their_required <= set(our_schema["properties"]), f"{ours} lacks {their_required - set(our_schema)}"
    for name, prop in our_schema["properties"].items():
        if name not in their_schema["properties"]:
            continue
        their_types = _json_types(their_schema["properties"][name], their_defs)
        our_types = _json_types(prop, defs)
        if name in their_required and (ours, name) not in NULLABLE_HERE_ONLY:
            assert "null" not in our_types or "null" in their_types, f"{ours}.{name} may be null"
        assert "any" in their_types or our_types <= their_types | {"null"} or our_types <= their_types, (
            f"{ours}.{name}: we send {our_types}, the OpenAI client expects {their_types}"
        )


def test_real_responses_conform_to_the_served_document(server: Any) -> None:
    """The document the server publishes is the one built here, and what the server answers matches it."""
    document = httpx.get(f"{server.base_url}/openapi.json", timeout=30).json()
    assert document == openapi_document(api_key=False, version=__version__)
    api = schemathesis.openapi.from_dict(document)
    base = server.base_url
    chat = {"model": MODEL, "messages": HI, "max_tokens": 3, "logprobs": True, "top_logprobs": 2}
    calls = [
        ("POST", "/v1/chat/completions", {"json": chat}),
        ("POST", "/v1/chat/completions", {"json": {**chat, "stream": True, "stream_options": {"include_usage": True}}}),
        ("POST", "/v1/completions", {"json": {"prompt": ["a", "b"], "n": 2, "max_tokens": 3, "logprobs": 1}}),
        ("POST", "/v1/completions", {"json": {"prompt": "a", "max_tokens": 3, "stream": True}}),
        ("POST", "/v1/completions", {"json": {"prompt": "a", "max_tokens": 0}}),  # 400
        ("POST", "/v1/completions", {"json": {"prompt": "a", "model": "gpt-4"}}),  # 404
        ("GET", "/v1/models", {}),
        ("GET", f"/v1/models/{MODEL}", {}),
        ("GET", "/v1/models/gpt-4", {}),  # 404
        ("GET", "/health", {}),
        ("GET", "/version", {}),
        ("GET", "/metrics", {}),
    ]
    for method, path, kwargs in calls:
        response = httpx.request(method, f"{base}{path}", timeout=60, **kwargs)
        template = "/v1/models/{model}" if path.startswith("/v1/models/") else path
        api[template][method].validate_response(response)  # raises, naming the violation
