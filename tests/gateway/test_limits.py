"""`--max-request-body-bytes` through a real server: a body over the limit is a 413 in OpenAI's shape, decided
before the body has arrived (from `Content-Length`, or by counting chunks of a chunked body); and a large body
under the limit is parsed, templated and tokenized off the event loop, so `/health` and other streams answer
meanwhile.

Raw sockets send the over-long bodies: a test can then send the headers and only part of the body, and a
server that waited for the rest would never answer (the socket's timeout fails the test instead of hanging).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

MODEL = "ernie-tiny"
LIMIT = 4096
CHAT: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
SOCKET_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def limited(launch: Any, checkpoint: Path) -> Iterator[Any]:
    server = launch(checkpoint, "--served-model-name", MODEL, "--max-request-body-bytes", str(LIMIT))
    yield server
    server.stop()


def _connect(server: Any) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=SOCKET_TIMEOUT)
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "the connection closed in the middle of the response body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def _head(path: str, *headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def assert_too_large(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 413, body
    assert headers["content-type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
    assert str(LIMIT) in error["message"]


def assert_still_serves(server: Any) -> None:
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=CHAT, timeout=60)
    assert response.status_code == 200, response.text


def test_declared_length_over_the_limit_is_refused_before_the_body_arrives(limited: Any) -> None:
    """Content-Length says 1 GB and only 10 bytes follow: the answer comes without the rest."""
    with _connect(limited) as sock:
        sock.sendall(_head("/v1/chat/completions", "Content-Length: 1000000000") + b'{"model":')
        status, headers, body = _read_response(sock)
    assert_too_large(status, headers, body)
    assert headers.get("connection") == "close"  # the unread body must not be taken for the next request
    assert_still_serves(limited)


def test_chunked_body_over_the_limit_is_refused_at_the_limit(limited: Any) -> None:
    """No Content-Length: chunks are counted as they arrive, and the body never ends (no last chunk), so
    only a server that stops at the limit can answer."""
    chunk = b"x" * 1024
    with _connect(limited) as sock:
        sock.sendall(_head("/v1/completions", "Transfer-Encoding: chunked"))
        for _ in range(LIMIT // len(chunk) + 1):
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        status, headers, body = _read_response(sock)
    assert_too_large(status, headers, body)
    assert_still_serves(limited)


def test_bodies_at_the_limit_are_served(limited: Any) -> None:
    """Exactly `LIMIT` bytes, declared or chunked, is allowed (the limit is inclusive)."""
    body = json.dumps(CHAT).encode()
    body += b" " * (LIMIT - len(body))  # JSON allows trailing whitespace
    url = f"{limited.base_url}/v1/chat/completions"
    declared = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)
    assert declared.status_code == 200, declared.text

    def pieces() -> Iterator[bytes]:  # a generator makes httpx send the body chunked
        yield from (body[i : i + 1000] for i in range(0, len(body), 1000))

    chunked = httpx.post(url, content=pieces(), headers={"content-type": "application/json"}, timeout=60)
    assert chunked.status_code == 200, chunked.text
    assert_still_serves(limited)


def test_over_the_limit_by_one_byte(limited: Any) -> None:
    body = json.dumps(CHAT).encode()
    body += b" " * (LIMIT + 1 - len(body))
    with _connect(limited) as sock:
        sock.sendall(_head("/v1/chat/completions", f"Content-Length: {len(body)}") + body)
        assert_too_large(*_read_response(sock))
    assert_still_serves(limited)


@pytest.fixture(scope="module")
def roomy(launch: Any, checkpoint: Path) -> Iterator[Any]:
    server = launch(checkpoint, "--served-model-name", MODEL, "--max-request-body-bytes", str(64 * 1024 * 1024))
    yield server
    server.stop()


def test_a_10mb_chat_body_does_not_stall_health_or_other_streams(roomy: Any) -> None:
    """While a ~10 MB conversation is parsed, templated and tokenized (tens of seconds of CPU here), `/health`
    answers and a small stream on another connection runs to its end, and only then does the big request's
    answer (a 400: far past the context limit) arrive. On the event loop, the big request would answer
    first: nothing else runs until its tokenization ends."""
    text = "hello world, this is a long text. " * 300_000
    big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 2}).encode()
    assert len(big) > 10_000_000
    with _connect(roomy) as sock:
        sock.sendall(_head("/v1/chat/completions", f"Content-Length: {len(big)}") + big)
        # The whole body is on its way; the server now works on it for seconds.
        assert httpx.get(f"{roomy.base_url}/health", timeout=SOCKET_TIMEOUT).json() == {"status": "ok"}
        stream = {**CHAT, "max_tokens": 4, "stream": True}
        with httpx.stream("POST", f"{roomy.base_url}/v1/chat/completions", json=stream, timeout=60) as response:
            lines = [line for line in response.iter_lines() if line]
        assert response.status_code == 200 and lines[-1] == "data: [DONE]"
        sock.setblocking(False)
        try:
            early = sock.recv(300)
        except BlockingIOError:
            early = None
        assert early is None, early
        sock.setblocking(True)
        status, _, body = _read_response(sock)
    assert status == 400, body
    assert json.loads(body)["error"]["param"] == "messages" or "context length" in json.loads(body)["error"]["message"]
    assert_still_serves(roomy)
