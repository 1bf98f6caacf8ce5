"""The Starlette app: OpenAI routes, health, metrics, plugin routes; its lifespan starts and stops the engine.

The engine loads in the background once the app starts, so `/health` can answer 503 while the model loads
(load balancers and Kubernetes probes see "not ready" rather than a refused connection).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from ernie_serve.async_engine import AsyncEngine
from ernie_serve.gateway.auth import APIKeyMiddleware, RequestIdMiddleware
from ernie_serve.gateway.chat_plan import ServerParsers
from ernie_serve.gateway.errors import EXCEPTION_HANDLERS, APIError
from ernie_serve.gateway.limits import BodyLimitMiddleware
from ernie_serve.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from ernie_serve.gateway.openapi import openapi_route
from ernie_serve.gateway.protocol import ModelCard, ModelList
from ernie_serve.gateway.serving import OpenAIServing
from ernie_serve.gateway.settings import ServerSettings

log = structlog.get_logger("ernie_serve.gateway")

PUBLIC_PATHS = ("/health",)


def _plugin_routes() -> tuple[list[Any], list[tuple[str, Any]]]:
    from ernie_serve.core.plugins import registry

    reg = registry()
    routes = [r.obj for r in reg.gateway_routes]
    transforms = [(name, r.obj) for name, r in reg.request_transforms.items()]
    return routes, transforms


def build_app(
    engine: AsyncEngine,
    settings: ServerSettings | None = None,
    *,
    model_name: str | None = None,
    on_engine_error: Callable[[BaseException], None] | None = None,
    use_plugins: bool = True,
) -> Starlette:
    """The gateway for `engine` (not started yet: the app's lifespan starts it and shuts it down).

    `model_name`: the name clients use (default: `--served-model-name`, else the `--model` value).
    `on_engine_error`: called if the engine fails to load or stops for good while serving (a crash, a fatal
    backend error, a hung step); the server exits non-zero on it.
    `use_plugins`: mount plugin routes and apply plugin request transforms.
    Raises `UnknownPluginError` when `--reasoning-parser` or `--tool-call-parser` names no registered parser.
    """
    settings = settings or ServerSettings()
    served = model_name or settings.served_model_name or engine.settings.model
    metrics = GatewayMetrics(engine, served)
    routes_from_plugins, transforms = _plugin_routes() if use_plugins else ([], [])
    serving = OpenAIServing(
        engine,
        metrics,
        served,
        max_concurrency=settings.max_concurrency,
        transforms=transforms,
        accepted_model_names=[engine.settings.model],
        parsers=ServerParsers.from_settings(settings),
    )
    state: dict[str, Any] = {"load_error": None}

    async def health(request: Request) -> Response:
        if serving.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if state["load_error"] is not None:
            return JSONResponse({"status": "error", "error": str(state["load_error"])}, status_code=503)
        if not engine.is_ready:
            status = "loading" if engine.is_loading else "stopped"
            return JSONResponse({"status": status}, status_code=503)
        return JSONResponse({"status": "ok"})

    def model_card() -> ModelCard:
        return ModelCard(
            id=served,
            root=engine.settings.model,
            max_model_len=engine.max_model_len if engine.is_ready else None,
        )

    async def list_models(request: Request) -> Response:
        return JSONResponse(ModelList(data=[model_card()]).model_dump(mode="json"))

    async def get_model(request: Request) -> Response:
        name = request.path_params["model"]
        if name not in serving.model_names:
            raise APIError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")
        return JSONResponse(model_card().model_dump(mode="json"))

    metrics_endpoint = _metrics_endpoint(metrics)

    async def version(request: Request) -> Response:
        from ernie_serve import __version__

        return JSONResponse({"version": __version__})

    routes: list[BaseRoute] = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/chat/completions", serving.chat, methods=["POST"]),
        Route("/v1/completions", serving.completions, methods=["POST"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
        openapi_route(api_key=bool(settings.api_keys)),  # behind the API key when there is one
    ]
    _add_plugin_routes(routes, routes_from_plugins)

    async def load() -> None:
        try:
            await engine.start()
        except Exception as exc:
            state["load_error"] = exc
            log.error("the engine failed to start", error=f"{type(exc).__name__}: {exc}")
            if on_engine_error is not None:
                on_engine_error(exc)
            return
        log.info("ready to serve", model=served, max_model_len=engine.max_model_len)
        state["death_watch"] = asyncio.create_task(watch_for_death())

    async def watch_for_death() -> None:
        error = await engine.wait_dead()  # returns only if the engine stops for good while serving
        log.error("the engine stopped; the server shuts down", error=f"{type(error).__name__}: {error}")
        if on_engine_error is not None:
            on_engine_error(error)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loader = asyncio.create_task(load())
        app.state.loader = loader
        try:
            yield
        finally:
            serving.draining = True
            if not loader.done():  # the load thread cannot be interrupted: let it finish, then stop
                with contextlib.suppress(BaseException):
                    await loader
            if "death_watch" in state:
                state["death_watch"].cancel()
            await engine.shutdown(timeout=0)

    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(RequestIdMiddleware),
            Middleware(BodyLimitMiddleware, max_bytes=settings.max_request_body_bytes),
            Middleware(APIKeyMiddleware, keys=settings.api_keys, public=PUBLIC_PATHS),
        ],
        exception_handlers=dict(EXCEPTION_HANDLERS),  # type: ignore[arg-type]
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.serving = serving
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.model_name = served
    app.state.status = state
    return app


def _add_plugin_routes(routes: list[BaseRoute], extra: Sequence[Any]) -> None:
    taken = {getattr(r, "path", None) for r in routes}
    for route in extra:
        if route.path in taken:
            log.warning("plugin route refused: the gateway already serves this path", path=route.path)
            continue
        taken.add(route.path)
        routes.append(route)


def _metrics_endpoint(metrics: GatewayMetrics) -> Callable[[Request], Awaitable[Response]]:
    """`GET /metrics` in Prometheus' text format."""

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return metrics_endpoint


def build_metrics_app(metrics: GatewayMetrics) -> Starlette:
    """The app behind `--metrics-port`: only `GET /metrics`, without authentication (scrapers reach it on
    its own port, which is usually kept internal)."""

    return Starlette(
        routes=[Route("/metrics", _metrics_endpoint(metrics), methods=["GET"])],
        exception_handlers=dict(EXCEPTION_HANDLERS),  # type: ignore[arg-type]
    )
