"""OpenAI's error body, `{"error": {"message", "type", "param", "code"}}`, for every failure the gateway answers.

A caller's mistake is a 4xx with a message that says what to change; anything unexpected is a 500 whose body
never carries a traceback (the traceback goes to the log).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_error"
SERVER_ERROR = "server_error"
UNAVAILABLE = "service_unavailable"

_TYPE_BY_STATUS = {400: INVALID_REQUEST, 401: AUTHENTICATION, 404: NOT_FOUND, 429: RATE_LIMIT, 503: UNAVAILABLE}


class APIError(Exception):
    """Raised anywhere in a handler to answer with OpenAI's error body."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type or _TYPE_BY_STATUS.get(status_code, SERVER_ERROR if status_code >= 500 else INVALID_REQUEST)
        self.param = param
        self.code = code
        self.headers = dict(headers or {})


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status_code, headers=exc.headers
    )


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


# Labels pydantic puts in an error location for union members and wrapped validators, not field names.
_LABEL = re.compile(r"[\[\]\-]|^(str|int|float|bool|list|dict|none|literal|union|model)$")


def error_param(loc: Sequence[str | int]) -> str | None:
    """A pydantic location as OpenAI's `param`: `("messages", 0, "content", "str")` -> `messages.0.content`."""
    # The first entry is always a top-level field, even one whose name looks like a label (`model`).
    parts = [str(p) for i, p in enumerate(loc) if i == 0 or isinstance(p, int) or not _LABEL.search(p)]
    return ".".join(parts) or None


def from_validation_error(exc: ValidationError) -> APIError:
    """The most telling error of a failed request validation as a 400.

    Our own checks (`value_error`) say what to change, so they win over the type errors that the other
    members of a union produce; JSON syntax errors are reported as such."""
    errors = exc.errors(include_url=False)
    if not errors:
        return bad_request("invalid request")
    if errors[0]["type"] == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {errors[0]['msg']}")
    best = next((e for e in errors if e["type"] == "value_error"), errors[0])
    param = error_param(best.get("loc", ()))
    message = best["msg"]
    if best["type"] == "value_error":
        message = message.removeprefix("Value error, ")
    if best["type"] == "model_type" and not best.get("loc"):
        message = "the request body must be a JSON object"
    elif best["type"] == "missing":
        message = f"'{param}' is required"
    elif param:
        message = f"{param}: {message}"
    return bad_request(message, param)


async def handle_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def handle_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ValidationError)
    return error_response(from_validation_error(exc))


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 (unknown route) and 405 (wrong method), in OpenAI's body."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(APIError(exc.status_code, message, headers=exc.headers))


async def handle_client_disconnect(request: Request, exc: Exception) -> Response:
    """The client left while sending its body: nobody reads the answer, and it is no error of ours."""
    return Response(status_code=499)


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    """Anything else: a 500 that says nothing about the code. Starlette re-raises the exception after this
    response is sent, so the server logs the traceback; the client never sees it."""
    return error_response(APIError(500, "internal server error", type=SERVER_ERROR))


EXCEPTION_HANDLERS = {
    APIError: handle_api_error,
    ValidationError: handle_validation_error,
    HTTPException: handle_http_exception,
    ClientDisconnect: handle_client_disconnect,
    Exception: handle_unexpected,
}
