"""Every extension point of ernie-serve, in one module.

A plugin is a module with functions decorated `@hookimpl` whose names match the hooks below, named by an
entry point in the `ernie_serve` group: `[project.entry-points.ernie_serve] myplugin = "my_pkg.plugin"`.
The built-ins are declared the same way in ernie-serve's own pyproject.toml (`schedulers`, `torch`, `onnx`,
`web_search`, `llguidance`, `ernie45`) and found the same way (`ernie_serve.core.plugins`).

Each hook receives a `register` callback instead of returning values, so a plugin can register any number
of things and the registry records which plugin provided each one. Hooks are called once per process, when
the registry is first built (`ernie_serve.core.plugins.registry()`), plugin by plugin in load order: the
built-ins, then third-party plugins sorted by distribution and entry-point name.

Core stays free of web-framework imports: gateway routes are typed structurally (`RouteLike`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import pluggy

if TYPE_CHECKING:
    from ernie_serve.core.backend import Backend
    from ernie_serve.core.scheduler import Scheduler

PROJECT_NAME = "ernie_serve"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@runtime_checkable
class RouteLike(Protocol):
    """What the gateway mounts: a starlette `Route`/`Mount`/`WebSocketRoute` or anything shaped like one."""

    path: str


# A chat-request transform takes the gateway's chat request (its pydantic model) and returns the request to
# template: the same object changed, a new one, or a dict the gateway validates into one. Sync or async.
RequestTransform = Callable[[Any], Any]

RegisterBackend = Callable[[str, "type[Backend]"], None]
RegisterScheduler = Callable[[str, "type[Scheduler]"], None]
RegisterModel = Callable[[str, type], None]
RegisterGrammarBackend = Callable[[str, type], None]
RegisterRoute = Callable[[RouteLike], None]
RegisterRequestTransform = Callable[[str, RequestTransform], None]
RegisterParser = Callable[[str, str, type], None]  # (kind: "reasoning" or "tool_call", name, parser class)


@hookspec
def register_backends(register: RegisterBackend) -> None:
    """Register backends: call `register(name, backend_cls)` with a `Backend` subclass per backend.

    Called once when the registry is built (first `ernie-serve plugins`, or first engine start). `name` is
    what `--backend` selects (e.g. "torch"). Register a backend even when its dependencies are missing here
    and report that from `Backend.availability()`, so `ernie-serve plugins` can list it with the reason (and
    its class's `capabilities` and `options_class` flags); import heavy dependencies lazily, inside the
    backend's methods or this hook.
    """


@hookspec
def register_schedulers(register: RegisterScheduler) -> None:
    """Register schedulers: call `register(name, scheduler_cls)` with a `Scheduler` subclass per scheduler.

    Called once when the registry is built. `name` is what `--scheduler` selects (e.g. "fcfs"); the engine
    instantiates the class when it starts.
    """


@hookspec
def register_models(register: RegisterModel) -> None:
    """Register model architectures for the torch backend: `register(architecture_name, model_cls)`.

    Called once when the registry is built. `architecture_name` is the HuggingFace `architectures[0]` of a
    checkpoint's config.json (e.g. "Ernie4_5_MoeForCausalLM"); the torch backend looks the class up by the
    loaded `ModelConfig.architecture` and constructs it.
    """


@hookspec
def register_grammar_backends(register: RegisterGrammarBackend) -> None:
    """Register grammar backends for structured output: `register(name, cls)`, `cls` an
    `ernie_serve.structured_output.GrammarBackend` subclass.

    Called once when the registry is built. `name` is what `--structured-outputs-backend` selects (default
    "llguidance"). The frontend makes one instance per engine, at the first structured-output request, and
    compiles specs with it on worker threads; its matchers run on the engine thread as `LogitsProcessor`s.
    """


@hookspec
def register_gateway_routes(register: RegisterRoute) -> None:
    """Register extra HTTP routes on the gateway: `register(route)` with a starlette `Route`-like object.

    Called once when the registry is built; the gateway mounts these routes after its built-in OpenAI
    routes when it builds its app (a path it already serves is refused with a logged warning).
    """


@hookspec
def register_request_transforms(register: RegisterRequestTransform) -> None:
    """Register chat-request transforms: `register(name, transform)`.

    Called once when the registry is built. The gateway applies every registered transform, in registration
    order, to each chat request before the chat template renders it (the offline `LLM.chat` does not); e.g. the
    built-in `web_search` plugin (plugins/web_search.py), which rewrites the last user message with
    ERNIE's search prompt when the request carries search results. See `RequestTransform`. A transform that
    raises `ValueError` (with an optional `param` attribute naming the field) rejects the request with a 400.
    """


@hookspec
def register_parsers(register: RegisterParser) -> None:
    """Register output parsers: `register("reasoning" | "tool_call", name, cls)`, cls a gateway `ReasoningParser` /
    `ToolParser` (ernie_serve/gateway/parsers.py). Called once when the registry is built; `--reasoning-parser` /
    `--tool-call-parser NAME` select one, and the gateway makes an instance per chat choice to parse its text."""
