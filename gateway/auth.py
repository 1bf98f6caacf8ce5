"""Pure ASGI middleware: API-key checks and `X-Request-Id`.

Pure ASGI rather than Starlette's `BaseHTTPMiddleware`, which would buffer streaming responses and hide the
client's disconnect from the handlers.
"""

from __future__ import annotations

import hmac
import json
import re
import uuid
from collections.abc import Iterable

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ernie_serve.gateway.errors import AUTHENTICATION, error_body

REQUEST_ID_HEADER = "x-request-id"
# A caller's id is echoed in a header and written to logs: keep it short and printable.
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")


def request_id(scope: Scope) -> str:
    """The id `RequestIdMiddleware` chose for this request (the caller's X-Request-Id, or a new one)."""
    return scope.get("state", {}).get("request_id") or uuid.uuid4().hex


class RequestIdMiddleware:
    """Takes the caller's `X-Request-Id` (or makes one), stores it in `scope["state"]`, echoes it back."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None)
        rid = given if given is not None and _VALID_REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = rid
            await send(message)

        await self.app(scope, receive, send_with_id)


class APIKeyMiddleware:
    """401 with OpenAI's body unless the request carries one of `keys` (`Authorization: Bearer KEY`, or
    `x-api-key: KEY`). Paths in `public` (health checks) need no key. No keys: everyone may call."""

    def __init__(self, app: ASGIApp, keys: Iterable[str], public: Iterable[str] = ("/health",)) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.public = frozenset(public)

    def _authorized(self, scope: Scope) -> bool | None:
        """True: a valid key; False: a wrong key; None: no key at all."""
        given: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                given = token.strip() if scheme.lower() == b"bearer" else value
                break
            if name == b"x-api-key":
                given = value.strip()
        if not given:
            return None
        # Compare against every key so the time taken does not say which one nearly matched.
        return any([hmac.compare_digest(given, key) for key in self.keys])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in self.public:
            await self.app(scope, receive, send)
            return
        ok = self._authorized(scope)
        if ok:
            await self.app(scope, receive, send)
            return
        message = (
            "missing API key: send it as 'Authorization: Bearer KEY'" if ok is None else "incorrect API key provided"
        )
        body = json.dumps(error_body(message, AUTHENTICATION, None, "invalid_api_key")).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
