"""The plugin registry: finds plugins through entry points and records what each one registered.

Every plugin, built-in or third-party, is a module named in the `ernie_serve` entry-point group; ernie-serve
declares its own in its pyproject.toml, so there is one discovery path. Loading order is fixed, so "first
registration wins" is predictable:
1. the entry points of the `ernie-serve` distribution itself (always, whatever `ERNIE_SERVE_PLUGINS` says);
2. third-party entry points allowed by `ERNIE_SERVE_PLUGINS`, sorted by distribution, then entry-point name.

A plugin that fails to import, declares an unknown hook (a typo such as `register_backend`), registers something
of the wrong kind, or raises in one of its hooks is logged and skipped as a whole; the others still load.
Nothing here imports torch: backend plugins import it inside their hooks.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Any, Generic, TypeVar

import pluggy

from ernie_serve.core import hookspecs
from ernie_serve.core.backend import Backend, BackendCapabilities, BackendOptions
from ernie_serve.core.errors import UserError
from ernie_serve.core.scheduler import Scheduler

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "ernie_serve"
ALLOWLIST_ENV = "ERNIE_SERVE_PLUGINS"
BUILTIN_DISTRIBUTION = "ernie-serve"  # its entry points are the built-ins

T = TypeVar("T")


class UnknownPluginError(UserError, KeyError):
    """A backend, scheduler or model name that no plugin registered; the message lists the known names."""

    def __str__(self) -> str:
        # KeyError's str() is the repr of its argument (quoted); callers print this as one readable line.
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Registration(Generic[T]):
    """One thing a plugin registered, and where it came from."""

    name: str  # the key: backend/scheduler name, architecture name, route path or transform name
    obj: T  # the class (or route object, or callable) that was registered
    provider: str  # the entry-point name of the plugin that registered it
    distribution: str | None  # the distribution declaring that entry point, e.g. "ernie-serve"
    version: str | None  # the distribution's version


@dataclass(frozen=True)
class PluginInfo:
    """One plugin (an entry point) that was found, and why it was skipped if it was."""

    name: str  # the entry-point name, e.g. "torch"
    module: str  # the entry point's value: "ernie_serve.backends.torch.plugin", or "pkg.module:attr"
    distribution: str | None
    version: str | None
    error: str | None = None  # one line; None for a plugin that loaded and whose hooks all ran

    @property
    def builtin(self) -> bool:
        return self.distribution == BUILTIN_DISTRIBUTION


@dataclass
class Registry:
    """Everything the loaded plugins registered. Built once per process by `registry()`."""

    backends: dict[str, Registration[type[Backend]]] = field(default_factory=dict)
    schedulers: dict[str, Registration[type[Scheduler]]] = field(default_factory=dict)
    models: dict[str, Registration[type]] = field(default_factory=dict)  # architecture name -> model class
    grammar_backends: dict[str, Registration[type]] = field(default_factory=dict)  # name -> GrammarBackend class
    gateway_routes: list[Registration[Any]] = field(default_factory=list)  # name = the route's path
    request_transforms: dict[str, Registration[Callable[[Any], Any]]] = field(default_factory=dict)
    parsers: dict[str, Registration[type]] = field(default_factory=dict)  # "reasoning:ernie45", "tool_call:ernie45"
    plugins: list[PluginInfo] = field(default_factory=list)  # loaded, in load order
    failures: list[PluginInfo] = field(default_factory=list)  # skipped, each with its `error`


_lock = threading.RLock()  # re-entrant: a hook that calls registry() fails, not deadlocks
_registry: Registry | None = None


def registry() -> Registry:
    """What every loaded plugin registered, built on first call (this imports the plugins and runs their hooks).

    Called by the engine when it resolves `--backend` / `--scheduler` / an architecture, by the gateway for
    routes and transforms, and by `ernie-serve plugins`. Later calls return the same registry until
    `reset_plugin_manager()`.
    """
    global _registry
    with _lock:
        if _registry is None:
            _registry = _build()
        return _registry


def reset_plugin_manager() -> None:
    """Forget the registry, so the next `registry()` rediscovers the plugins. For tests (after changing
    `sys.path` or `ERNIE_SERVE_PLUGINS`); already-imported plugin modules stay in `sys.modules`."""
    global _registry
    with _lock:
        _registry = None
        # importlib.metadata's path finders cache directory listings; a new *.dist-info must be seen.
        importlib.invalidate_caches()


def _entry_points() -> list[PluginInfo]:
    """The plugins to load, in load order: built-ins, then the third-party ones `ERNIE_SERVE_PLUGINS=a,b`
    allows (unset: all; set but empty: none)."""
    raw = os.environ.get(ALLOWLIST_ENV)
    allow = None if raw is None else {name.strip() for name in raw.split(",") if name.strip()}
    found = [
        PluginInfo(ep.name, ep.value, ep.dist.name if ep.dist else None, ep.dist.version if ep.dist else None)
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)
    ]
    for missing in sorted((allow or set()) - {info.name for info in found}):
        logger.warning("%s names plugin %r, but no installed distribution provides it", ALLOWLIST_ENV, missing)
    # Sorted because the order distributions are found in depends on sys.path and directory listings.
    found.sort(key=lambda info: (not info.builtin, info.distribution or "", info.name))
    return [info for info in found if info.builtin or allow is None or info.name in allow]


def _skip(reg: Registry, info: PluginInfo, error: str) -> None:
    where = f" (from {info.distribution} {info.version})" if info.distribution else ""
    extra = {"plugin": info.name, "distribution": info.distribution, "plugin_error": error}
    logger.warning("plugin %r%s skipped: %s", info.name, where, error, extra=extra)
    reg.failures.append(replace(info, error=error))


def _build() -> Registry:
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    reg = Registry()
    loaded: list[tuple[PluginInfo, Any]] = []  # in load order: pluggy keeps plugins in a set
    for info in _entry_points():
        try:
            plugin = metadata.EntryPoint(info.name, info.module, ENTRY_POINT_GROUP).load()  # "pkg.mod[:attr]"
            # Validates hook signatures; refuses a name or a module already registered (declared twice).
            pm.register(plugin, name=info.name)
        except Exception as exc:  # import errors, missing optional deps, bad hook signatures: skip, go on
            _skip(reg, info, f"{type(exc).__name__}: {exc}")
            continue
        loaded.append((info, plugin))
    while True:  # check_pending reports one unknown hook (a typo) at a time: drop each offender in turn
        try:
            pm.check_pending()
            break
        except pluggy.PluginValidationError as exc:
            info = next(info for info, plugin in loaded if plugin is exc.plugin)
            pm.unregister(exc.plugin)
            loaded.remove((info, exc.plugin))
            _skip(reg, info, str(exc))  # pluggy's message names the hook: "unknown hook 'register_backend' ..."
    for info, plugin in loaded:
        items: list[tuple[str, str, Any]] = []
        error = _run_hooks(pm, plugin, items)
        if error is not None:
            pm.unregister(plugin)
            _skip(reg, info, error)
            continue
        _merge(reg, info, items)
        reg.plugins.append(info)
    return reg


def _run_hooks(pm: pluggy.PluginManager, plugin: Any, items: list[tuple[str, str, Any]]) -> str | None:
    """Call every hook `plugin` implements, appending (table, name, obj) to `items` for each registration.
    Returns None when all ran, else one line naming the hook that raised (the caller then drops `items`)."""

    def add(table: str, kind: str, base: type | None) -> Callable[[str, Any], None]:
        def register(name: str, obj: Any) -> None:  # a TypeError here skips the plugin with this message
            if not isinstance(name, str) or not name:
                raise TypeError(f"{kind} name must be a non-empty string, got {name!r}")
            if base is None and not callable(obj):
                raise TypeError(f"{kind} {name!r} must be callable, got {obj!r}")
            if base is not None and not (isinstance(obj, type) and issubclass(obj, base)):
                what = "a class" if base is object else f"a subclass of {base.__qualname__}"
                raise TypeError(f"{kind} {name!r} must be {what}, got {obj!r}")
            items.append((table, name, obj))

        return register

    def backend(name: str, cls: Any) -> None:
        add("backends", "backend", Backend)(name, cls)  # a failure below still drops it: items are discarded
        # Checked once here, so the engine and `ernie-serve plugins` can read these class attributes as declared.
        caps, options = cls.capabilities, cls.options_class
        if not isinstance(caps, BackendCapabilities):
            raise TypeError(f"backend {name!r}: `capabilities` must be a BackendCapabilities, got {caps!r}")
        if not (isinstance(options, type) and issubclass(options, BackendOptions)):
            raise TypeError(f"backend {name!r}: `options_class` must be a BackendOptions subclass, got {options!r}")

    def route(route: Any) -> None:
        if not isinstance(route, hookspecs.RouteLike) or not isinstance(route.path, str):
            raise TypeError(f"gateway route must have a string `path` attribute, got {route!r}")
        items.append(("gateway_routes", route.path, route))

    callbacks: dict[str, Callable[..., None]] = {
        "register_backends": backend,
        "register_schedulers": add("schedulers", "scheduler", Scheduler),
        "register_models": add("models", "model", object),
        "register_grammar_backends": add("grammar_backends", "grammar backend", object),
        "register_gateway_routes": route,
        "register_request_transforms": add("request_transforms", "request transform", None),
        "register_parsers": lambda kind, name, cls: add("parsers", f"{kind} parser", object)(f"{kind}:{name}", cls),
    }
    for hook_name, register in callbacks.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            if impl.plugin is not plugin:
                continue
            try:
                # Called per plugin rather than through pm.hook so one plugin's exception is attributable and
                # does not stop the others; a hookimpl may take a subset of the spec's arguments.
                impl.function(**dict.fromkeys(impl.argnames, register))
            except Exception as exc:
                return f"{hook_name}: {type(exc).__name__}: {exc}"
    return None


def _merge(reg: Registry, info: PluginInfo, items: list[tuple[str, str, Any]]) -> None:
    for table_name, name, obj in items:
        item = Registration(name, obj, info.name, info.distribution, info.version)
        if table_name == "gateway_routes":  # the gateway refuses duplicate paths itself, with its own warning
            reg.gateway_routes.append(item)
            continue
        table: dict[str, Registration[Any]] = vars(reg)[table_name]
        first = table.setdefault(name, item)
        if first is not item:
            kind, extra = table_name.rstrip("s"), {"plugin": info.name, "registered_by": first.provider}
            message = "%s %r registered by %r is ignored: already registered by %r"
            logger.warning(message, kind, name, info.name, first.provider, extra=extra)


def _lookup(kind: str, table: dict[str, Registration[Any]], name: str) -> Any:
    try:
        return table[name].obj
    except KeyError:
        known = ", ".join(sorted(table)) or "none"
        message = f"unknown {kind} {name!r}; registered {kind}s: {known} (see `ernie-serve plugins`)"
        raise UnknownPluginError(message) from None


def get_backend_class(name: str) -> type[Backend]:
    """The backend class registered as `name` (what `--backend` selects); `UnknownPluginError` if none."""
    return _lookup("backend", registry().backends, name)


def get_scheduler_class(name: str) -> type[Scheduler]:
    """The scheduler class registered as `name` (what `--scheduler` selects); `UnknownPluginError` if none."""
    return _lookup("scheduler", registry().schedulers, name)


def get_grammar_backend_class(name: str) -> type:
    """The grammar backend class registered as `name` (`--structured-outputs-backend`); `UnknownPluginError`."""
    return _lookup("grammar backend", registry().grammar_backends, name)


def get_model_class(architecture: str) -> type:
    """The torch model class for a config.json architecture name; `UnknownPluginError` if none."""
    return _lookup("model architecture", registry().models, architecture)
