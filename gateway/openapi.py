"""The gateway's OpenAPI 3.1 document, generated from the protocol models, and the `GET /openapi.json` route.

Request and response bodies are pydantic's JSON Schemas of the models in `protocol.py` (requests as they are
validated, responses as they are serialized), so the document cannot drift from what the server parses and
sends. A few request rules live in validators rather than in field types (the roles a message may have, the
four shapes of a completion prompt, non-empty stop strings); `_REQUEST_RULES` writes them into the schema, and
`tests/gateway/test_openapi.py` checks that the models reject what those rules exclude.

`/openapi.json` sits behind the API key like every route but `/health`: it describes only this public API,
but a server started with `--api-key` answers nothing else to a caller without one, and a client that holds a
key can read it (vLLM serves it openly; nothing here needs that).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, JsonSchemaValue, models_json_schema
from pydantic_core import core_schema
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ernie_serve import __version__
from ernie_serve.gateway.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)

OPENAPI_VERSION = "3.1.0"
REF_TEMPLATE = "#/components/schemas/{model}"


class ErrorInfo(BaseModel):
    """OpenAI's error object: all four keys are always present (`param` and `code` may be null)."""

    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorResponse(BaseModel):
    """The body of every error answer, as `gateway/errors.py` writes it."""

    error: ErrorInfo


class HealthStatus(BaseModel):
    """`GET /health`: `ok` when serving; `loading`, `stopped`, `error` or `shutting down` (with a 503) when not.
    (app.py writes it as a plain dict; the OpenAPI test checks the real answer against this.)"""

    status: str
    error: str | None = None


class VersionInfo(BaseModel):
    """`GET /version`."""

    version: str


# Body schemas: (model, mode). Requests are described as they are validated, everything else as it is sent.
_MODELS: list[tuple[type[BaseModel], JsonSchemaMode]] = [
    (ChatCompletionRequest, "validation"),
    (CompletionRequest, "validation"),
    (ChatCompletionResponse, "serialization"),
    (ChatCompletionChunk, "serialization"),
    (CompletionResponse, "serialization"),
    (ModelList, "serialization"),
    (ModelCard, "serialization"),
    (ErrorResponse, "serialization"),
    (HealthStatus, "serialization"),
    (VersionInfo, "serialization"),
]

# Token ids are never negative (their upper bound is the model's vocabulary, which the document does not know).
_TOKEN_ID: JsonSchemaValue = {"type": "integer", "minimum": 0}
_TOKEN_IDS: JsonSchemaValue = {"type": "array", "items": _TOKEN_ID, "minItems": 1}
_STOP_TOKEN_IDS: JsonSchemaValue = {"anyOf": [{"type": "array", "items": _TOKEN_ID}, {"type": "null"}]}


def _non_empty_strings(schema: Any) -> Any:
    """`schema` with `minLength: 1` on every string in it: stop strings must not be empty. (A patch rather
    than a replacement, so that limits added to the field later, such as a longest list, are kept.)"""
    if isinstance(schema, list):
        return [_non_empty_strings(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    patched = {k: _non_empty_strings(v) for k, v in schema.items()}
    if patched.get("type") == "string":
        patched.setdefault("minLength", 1)
    return patched


_PROMPT: JsonSchemaValue = {
    "description": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
        _TOKEN_IDS,
        {"type": "array", "items": _TOKEN_IDS, "minItems": 1},
    ],
}

# Request rules that the models enforce in validators, merged into their generated schemas: `properties`
# replace the generated ones (a function patches the generated one instead), `required` adds to the list, any
# other keyword is added as is. test_openapi checks each rule against the model.
_REQUEST_RULES: dict[str, dict[str, Any]] = {
    "ChatMessage": {
        "properties": {"role": {"type": "string", "enum": ["system", "user", "assistant", "developer", "tool"]}},
        # only an assistant turn may come without content
        "anyOf": [
            {"properties": {"role": {"const": "assistant"}}},
            {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
        ],
    },
    "TextContentPart": {
        "properties": {"type": {"type": "string", "const": "text"}, "text": {"type": "string"}},
        "required": ["text"],
    },
    "ChatCompletionRequest": {"properties": {"stop": _non_empty_strings, "stop_token_ids": _STOP_TOKEN_IDS}},
    "CompletionRequest": {
        "properties": {"prompt": _PROMPT, "stop": _non_empty_strings, "stop_token_ids": _STOP_TOKEN_IDS}
    },
}


class _Generator(GenerateJsonSchema):
    """pydantic's generator, except that a model serializer returning `dict[str, Any]` is described by the
    model's fields: the protocol's serializers only leave out keys whose value is null (`DeltaMessage`, the
    `usage` of stream chunks), and such keys are optional in the schema already."""

    def ser_schema(
        self,
        schema: core_schema.SerSchema | core_schema.IncExSeqSerSchema | core_schema.IncExDictSerSchema,
    ) -> JsonSchemaValue | None:
        if schema["type"] == "function-wrap":
            returned = schema.get("return_schema")
            if returned is not None and returned["type"] == "dict":
                return None  # pydantic then uses the model's own schema
        return super().ser_schema(schema)


def component_schemas() -> dict[str, JsonSchemaValue]:
    """Every body schema of the API, by name, with `#/components/schemas/...` references."""
    _, top = models_json_schema(_MODELS, ref_template=REF_TEMPLATE, schema_generator=_Generator)
    schemas: dict[str, JsonSchemaValue] = top["$defs"]
    for name, rule in _REQUEST_RULES.items():
        schema = schemas[name]
        for keyword, value in rule.items():
            if keyword == "properties":
                for prop, new in value.items():
                    schema["properties"][prop] = new(schema["properties"][prop]) if callable(new) else new
            elif keyword == "required":
                schema["required"] = sorted({*schema.get("required", []), *value})
            else:
                schema[keyword] = value
    return schemas


def _ref(name: str) -> JsonSchemaValue:
    return {"$ref": REF_TEMPLATE.format(model=name)}


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(name)}}


# Errors every route may answer (OpenAI's body), and why.
_ERRORS: dict[int, str] = {
    400: "the request is invalid (the message names the parameter in `param`)",
    401: "a missing or wrong API key (only when the server was started with `--api-key`)",
    404: "no such model",
    413: "the request body is larger than `--max-request-body-bytes`",
    429: "more requests in flight than `--max-concurrency`",
    500: "an unexpected error in the server",
    503: "the model is loading, the engine stopped, or the server is shutting down",
}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"description": _ERRORS[s], "content": _json("ErrorResponse")} for s in statuses}


def _sse_event(chunk: str) -> JsonSchemaValue:
    """One server-sent event of a stream (OpenAPI 3.1 has no keyword for the items of a stream, so the
    schema of an event-stream body describes each event, as OpenAPI 3.2's `itemSchema` does; the `data` text is
    JSON described with `contentMediaType` and `contentSchema`)."""
    json_data = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [_ref(chunk), _ref("ErrorResponse")]},
    }
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"anyOf": [{"const": "[DONE]"}, {**json_data, "not": {"const": "[DONE]"}}]}},
    }


def _generation(summary: str, request: str, response: str, chunk: str) -> dict[str, Any]:
    """A POST operation that answers JSON, or server-sent events when the body says `"stream": true`."""
    return {
        "summary": summary,
        "requestBody": {"required": True, "content": _json(request)},
        "responses": {
            "200": {
                "description": (
                    f"`{response}`; with `stream: true`, server-sent events whose `data:` lines are `{chunk}` "
                    'objects, an `{"error": ...}` object if generation fails midway, and finally `[DONE]`'
                ),
                "content": {
                    **_json(response),
                    "text/event-stream": {"schema": _sse_event(chunk)},
                },
            },
            **_errors(400, 401, 404, 413, 429, 500, 503),
        },
    }


def _get(summary: str, ok: dict[str, Any], *errors: int) -> dict[str, Any]:
    return {"summary": summary, "responses": {"200": {"description": "OK", "content": ok}, **_errors(*errors)}}


def openapi_document(*, api_key: bool, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the gateway's own routes (not plugin routes).

    `api_key`: the server checks API keys, so every operation but `/health` declares bearer authentication
    (or `x-api-key`) and may answer 401; without keys nothing declares it and no 401 is documented.
    """
    model_param = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    health_ok = {"application/json": {"schema": _ref("HealthStatus")}}
    paths: dict[str, Any] = {
        "/v1/chat/completions": {
            "post": {
                "operationId": "createChatCompletion",
                **_generation(
                    "Chat completion", "ChatCompletionRequest", "ChatCompletionResponse", "ChatCompletionChunk"
                ),
            }
        },
        "/v1/completions": {
            "post": {
                "operationId": "createCompletion",
                **_generation("Text completion", "CompletionRequest", "CompletionResponse", "CompletionResponse"),
            }
        },
        "/v1/models": {"get": {"operationId": "listModels", **_get("The served model", _json("ModelList"), 401, 500)}},
        "/v1/models/{model}": {
            "get": {
                "operationId": "retrieveModel",
                "parameters": [model_param],
                **_get("One model by name", _json("ModelCard"), 401, 404, 500),
            }
        },
        "/health": {
            "get": {
                "operationId": "health",
                "summary": "Readiness: 200 once the model is loaded and the engine runs",
                "security": [],
                "responses": {
                    "200": {"description": "ready", "content": health_ok},
                    "503": {
                        "description": "not ready (loading, stopped, failed) or shutting down",
                        "content": health_ok,
                    },
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                **_get("Prometheus metrics", {"text/plain": {"schema": {"type": "string"}}}, 401, 500),
            }
        },
        "/version": {"get": {"operationId": "version", **_get("The server's version", _json("VersionInfo"), 401, 500)}},
    }
    document: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "ernie-serve",
            "version": version,
            "description": "OpenAI-compatible API of ernie-serve (field names and types as the OpenAI client's).",
        },
        "paths": paths,
        "components": {"schemas": component_schemas()},
    }
    if api_key:
        document["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key"},
        }
        document["security"] = [{"bearer": []}, {"apiKeyHeader": []}]
    else:  # nobody sends a 401: leave it out, so a fuzzer that gets one reports it
        for item in paths.values():
            for operation in item.values():
                operation["responses"].pop("401", None)
    return document


def openapi_route(*, api_key: bool) -> Route:
    """`GET /openapi.json`, the document rendered once when the app is built."""
    body = json.dumps(openapi_document(api_key=api_key, version=__version__)).encode()

    async def openapi_json(request: Request) -> Response:
        return Response(body, media_type="application/json")

    return Route("/openapi.json", openapi_json, methods=["GET"])
