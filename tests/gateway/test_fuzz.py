"""Schema-driven fuzzing: schemathesis generates requests for every operation in the server's own
`/openapi.json` (valid ones and ones that break the schema) and sends them to a real server on 127.0.0.1.

Each response must pass schemathesis' checks (no 5xx, a documented status and content type, a body that
matches the documented schema, schema-breaking input rejected with a 4xx) and ours: every 4xx/5xx body is
OpenAI's error object, and a stream is `data:` events of chunk objects ending in `[DONE]`. A request that takes
longer than `REQUEST_TIMEOUT` fails the test as a hang.

CI runs a few examples per operation; `ERNIE_SERVE_FUZZ_EXAMPLES=N` raises the count (docs/reliability.md,
"Fuzzing", has the long run's command and figures). Valid requests are kept cheap by `cap_generation`, which
lowers `max_tokens`, `max_completion_tokens`, `min_tokens` and `n` to small values that are just as valid,
and by the server's `--max-model-len 128`, which bounds requests that leave `max_tokens` out.

`positive_data_acceptance` (schemathesis' "a schema-valid request must get a 2xx") is not checked: some valid
requests are refused on purpose, for reasons a schema cannot state (a prompt longer than the context, a token
id outside this model's vocabulary, a seed beyond 64 bits, `stream_options` without `stream`, an integral
float such as `4.0` for an integer under strict validation).
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from schemathesis import Case, CheckContext, GenerationMode, Response
from schemathesis.schemas import BaseSchema
from schemathesis.specs.openapi.checks import positive_data_acceptance

from ernie_serve.gateway.openapi import ErrorInfo, ErrorResponse, openapi_document
from ernie_serve.gateway.protocol import ChatCompletionChunk, CompletionResponse

EXAMPLES = int(os.environ.get("ERNIE_SERVE_FUZZ_EXAMPLES", "10"))
REQUEST_TIMEOUT = 60.0  # seconds; a tiny model answers any capped request in well under one
MAX_TOKENS = 4
MAX_N = 2
MAX_STREAM_EVENTS = 100_000

# Responses seen, by operation and status, for the summary printed at the end (`-s` shows it).
SEEN: collections.Counter[tuple[str, int]] = collections.Counter()


@pytest.fixture(scope="module")
def fuzz_server(
    launch: Callable[..., Any], checkpoint: Path, environment: Callable[..., dict[str, str]]
) -> Iterator[Any]:
    """A server of its own: a short context bounds what an uncapped request can cost."""
    server = launch(checkpoint, "--served-model-name", "ernie-tiny", "--max-model-len", "128", env=environment())
    yield server
    server.stop()
    if SEEN:
        total = sum(SEEN.values())
        by_status = collections.Counter()
        for (_, status), count in SEEN.items():
            by_status[status] += count
        print(f"\nfuzzing: {total} requests, by status {dict(sorted(by_status.items()))}")
        for (label, status), count in sorted(SEEN.items()):
            print(f"  {label}: {status} x {count}")


@pytest.fixture(scope="module")
def api_schema(fuzz_server: Any) -> BaseSchema:
    """The document as the server publishes it."""
    schema = schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json", timeout=30)
    # schemathesis stops reading a stream after 20 events by default; read each to its end (a stream is at most
    # n x prompts x 128 tokens here), so that `sse_stream_shape` sees the `[DONE]` that must end it.
    schema.config.max_stream_events = MAX_STREAM_EVENTS
    return schema


# Every operation of the document, known without a server so that pytest can name one test per operation.
# (schemathesis' own `from_fixture` parametrization reads a private pytest attribute that pytest 9 removed.)
OPERATIONS = [
    (method.upper(), path)
    for path, item in openapi_document(api_key=False, version="")["paths"].items()
    for method in item
]
_STRATEGIES: dict[tuple[str, str], st.SearchStrategy[Case]] = {}


def case_strategy(api_schema: BaseSchema, method: str, path: str) -> st.SearchStrategy[Case]:
    """Schema-valid and schema-breaking requests for one operation, built once per operation."""
    key = (method, path)
    if key not in _STRATEGIES:
        operation = api_schema[path][method]
        modes = [GenerationMode.POSITIVE]
        if operation.body or operation.path_parameters:  # nothing to break in a GET without parameters
            modes.append(GenerationMode.NEGATIVE)
        _STRATEGIES[key] = st.one_of(*(operation.as_strategy(generation_mode=mode) for mode in modes))
    return _STRATEGIES[key]


def cap_generation(body: Any) -> None:
    """Lower the numbers that decide how much a request generates, in place, to values that keep the request
    exactly as valid or invalid as it was: only integers above the cap and within the schema's range change,
    and only to values that are in range."""
    if not isinstance(body, dict):
        return
    for key, cap in (("max_tokens", MAX_TOKENS), ("max_completion_tokens", MAX_TOKENS), ("min_tokens", MAX_TOKENS)):
        value = body.get(key)
        if type(value) is int and value > cap:  # the schema sets no maximum: any larger value was valid
            body[key] = cap
    n = body.get("n")
    if type(n) is int and MAX_N < n <= 128:  # n > 128 is invalid, and cheap: it is refused before generating
        body["n"] = MAX_N


def _is_json(response: Response) -> bool:
    return response.headers.get("content-type", [""])[0].startswith("application/json")


def openai_error_shape(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """Every error is OpenAI's `{"error": {"message", "type", "param", "code"}}`, as JSON."""
    if response.status_code < 400:
        return None
    assert _is_json(response), f"a {response.status_code} answered as {response.headers.get('content-type')}"
    try:
        error = ErrorResponse.model_validate_json(response.content, strict=True)
    except ValidationError as exc:
        raise AssertionError(f"a {response.status_code} body is not OpenAI's error object: {exc}") from None
    assert error.error.message, "an error without a message"
    return None


def sse_stream_shape(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """A stream is `data:` events, each a chunk object (or OpenAI's error object), ending with `[DONE]`."""
    if response.status_code != 200 or not response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        return None
    chunk_model = ChatCompletionChunk if case.path == "/v1/chat/completions" else CompletionResponse
    events = [line.removeprefix("data: ") for line in response.text.split("\n") if line.startswith("data: ")]
    assert not response.stream_cut_short, f"the stream did not end within {MAX_STREAM_EVENTS} events or the timeout"
    assert events and events[-1] == "[DONE]", f"the stream does not end with [DONE]: {response.text[-200:]!r}"
    for event in events[:-1]:
        data = json.loads(event)
        try:
            if "error" in data:
                ErrorInfo.model_validate(data["error"], strict=True)
            else:
                chunk_model.model_validate(data, strict=True)
        except ValidationError as exc:
            raise AssertionError(f"a stream event is neither a {chunk_model.__name__} nor an error: {exc}") from None
    return None


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
@settings(
    max_examples=EXAMPLES,
    deadline=None,  # a request's duration is the server's, not a property of the generated data
    suppress_health_check=list(HealthCheck),  # slow generation and large bodies are what fuzzing is for
    print_blob=True,  # a failure prints the @reproduce_failure line that replays it
)
@given(data=st.data())
def test_fuzz(api_schema: BaseSchema, method: str, path: str, data: st.DataObject) -> None:
    case = data.draw(case_strategy(api_schema, method, path), label="case")
    cap_generation(case.body)
    response = case.call(timeout=REQUEST_TIMEOUT)
    SEEN[(f"{method} {path}", response.status_code)] += 1
    case.validate_response(
        response,
        excluded_checks=[positive_data_acceptance],
        additional_checks=[openai_error_shape, sse_stream_shape],
    )
