"""Running the gateway: uvicorn on the API port (and on `--metrics-port`), SIGTERM as a graceful drain.

One uvicorn server listens on `--port` and, when given, `--metrics-port` (which serves only `/metrics`).
On SIGTERM or Ctrl+C the server stops accepting connections and `/health` turns 503; requests in flight run
for up to `--shutdown-timeout` seconds, then the rest are aborted (their streams end with finish_reason
"abort"); the engine stops and the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType

import structlog
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from ernie_serve.async_engine import AsyncEngine
from ernie_serve.core.config import EngineSettings
from ernie_serve.core.errors import UserError
from ernie_serve.gateway.app import build_app, build_metrics_app
from ernie_serve.gateway.settings import ServerSettings

log = structlog.get_logger("ernie_serve.gateway")

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# uvicorn's own backstop after our drain (which aborts at --shutdown-timeout) has had its chance.
_UVICORN_GRACE_MARGIN = 10.0


class ServerStartError(UserError, OSError):
    """A port could not be bound; the message names the address."""


@dataclass
class ServeResult:
    exit_code: int
    error: BaseException | None = None


class _Server(uvicorn.Server):
    """uvicorn's server with our signal handling: the first signal starts a drain, and the process exits 0
    afterwards (uvicorn would re-raise the signal, killing the process with it)."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[int], None] | None) -> None:
        super().__init__(config)
        self._on_signal = on_signal

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if self._on_signal is None or threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in _SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:  # a second signal: stop waiting for anyone
            self.force_exit = True
            return
        self.should_exit = True
        if self._on_signal is not None:
            self._on_signal(sig)


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before the model loads, so a busy port is one clear error and not a failure minutes later."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServerStartError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _config(app: ASGIApp, settings: ServerSettings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # our logging set-up renders uvicorn's records too
        access_log=False,  # the gateway logs one structured event per request instead
        lifespan="on",
        timeout_graceful_shutdown=int(settings.shutdown_timeout + _UVICORN_GRACE_MARGIN),
    )


class PortRouter:
    """One uvicorn server listens on the API port and the metrics port; requests that arrive on the metrics
    port go to the metrics-only app, everything else (and the lifespan) to the gateway."""

    def __init__(self, app: ASGIApp, metrics_app: ASGIApp, metrics_port: int) -> None:
        self.app = app
        self.metrics_app = metrics_app
        self.metrics_port = metrics_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        if scope["type"] == "http" and server is not None and server[1] == self.metrics_port:
            await self.metrics_app(scope, receive, send)
        else:
            await self.app(scope, receive, send)


async def serve(engine_settings: EngineSettings, settings: ServerSettings, sockets: list[socket.socket]) -> ServeResult:
    """Serve until a signal (exit 0) or an engine that fails to load (exit 1). `sockets`: already bound by
    `run` (the API socket first, then the metrics socket when `--metrics-port` is set)."""
    loop = asyncio.get_running_loop()
    result = ServeResult(0)
    engine = AsyncEngine(engine_settings)
    server: _Server | None = None
    drain_tasks: list[asyncio.Task[None]] = []

    def on_engine_error(exc: BaseException) -> None:
        result.exit_code, result.error = 1, exc
        if server is not None:
            server.should_exit = True

    app = build_app(engine, settings, on_engine_error=on_engine_error)

    def on_signal(sig: int) -> None:
        log.info("shutting down", signal=signal.Signals(sig).name, timeout_s=settings.shutdown_timeout)

        def start_drain() -> None:
            drain_tasks.append(loop.create_task(app.state.serving.drain(settings.shutdown_timeout)))

        loop.call_soon_threadsafe(start_drain)

    asgi: ASGIApp = app
    urls = {"api": _url(settings.host, sockets[0])}
    if len(sockets) > 1:
        asgi = PortRouter(app, build_metrics_app(app.state.metrics), sockets[1].getsockname()[1])
        urls["metrics"] = _url(settings.host, sockets[1]) + "/metrics"
    server = _Server(_config(asgi, settings), on_signal)
    log.info("listening", model=app.state.model_name, **urls)
    try:
        await server.serve(sockets=sockets)
    finally:
        for task in drain_tasks:
            task.cancel()
    return result


def _url(host: str, sock: socket.socket) -> str:
    port = sock.getsockname()[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(engine_settings: EngineSettings, settings: ServerSettings) -> ServeResult:
    """Bind, serve, and return when the server has stopped (the CLI's `serve`)."""
    sockets = [bind_socket(settings.host, settings.port)]
    if settings.metrics_port is not None:
        sockets.append(bind_socket(settings.host, settings.metrics_port))
    try:
        return asyncio.run(serve(engine_settings, settings, sockets))
    finally:
        for sock in sockets:
            sock.close()
