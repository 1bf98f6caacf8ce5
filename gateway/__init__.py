"""The OpenAI-compatible HTTP gateway: a Starlette app over `AsyncEngine`, run by uvicorn.

`build_app(engine, settings)` gives the ASGI app (its lifespan starts and stops the engine);
`ernie_serve.gateway.server.run` serves it the way `ernie-serve serve` does. Names load on first use, so
the CLI can read `ServerSettings` without importing the web stack or the engine.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_LAZY = {
    "build_app": "ernie_serve.gateway.app",
    "build_metrics_app": "ernie_serve.gateway.app",
    "ServerSettings": "ernie_serve.gateway.settings",
}

__all__ = ["ServerSettings", "build_app", "build_metrics_app"]

if TYPE_CHECKING:
    from ernie_serve.gateway.app import build_app, build_metrics_app
    from ernie_serve.gateway.settings import ServerSettings


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ernie_serve.gateway' has no attribute {name!r}")
