"""Pure ASGI middleware that bounds the size of a request body before anyone reads it in full.

A request that declares a `Content-Length` over the limit is answered 413 at once, before a byte of its body
is read. A body without one (`Transfer-Encoding: chunked`) is counted as its chunks arrive, and reading stops
at the first chunk that takes it over the limit: the handler's `await request.body()` raises
`BodyTooLargeError`, an `APIError` that the gateway's exception handlers answer as 413. Either way the
connection is closed afterwards, since the rest of the body is never read.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ernie_serve.gateway.errors import INVALID_REQUEST, APIError, error_body

# OpenAI's clients retry neither 413 nor this code; the code names what to change.
_CODE = "request_too_large"


class BodyTooLargeError(APIError):
    """The request body is larger than `--max-request-body-bytes` (raised from `receive` while reading it)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"the request body is larger than this server's limit of {limit} bytes (--max-request-body-bytes)",
            type=INVALID_REQUEST,
            code=_CODE,
            # The unread rest of the body would otherwise be parsed as the next request on this connection.
            headers={"connection": "close"},
        )


class BodyLimitMiddleware:
    """413 with OpenAI's error body for request bodies over `max_bytes`, decided from `Content-Length` when
    the client sends one and by counting received chunks otherwise."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _declared_length(self, scope: Scope) -> int | None:
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:  # the server rejects these before us; count the chunks if one slips by
                    return None
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = self._declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _send_error(send, BodyTooLargeError(self.max_bytes))
            return

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLargeError as exc:
            # Normally the app's exception handlers answer it; this covers a reader outside their reach (a
            # plugin's middleware, say). Once a response has started there is nothing left to say.
            if started:
                raise
            await _send_error(send, exc)


async def _send_error(send: Send, exc: APIError) -> None:
    body = json.dumps(error_body(exc.message, exc.type, exc.param, exc.code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items()]
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
