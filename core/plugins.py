"""The plugin registry: loads built-in and third-party plugins and records what each one registered.

Loading order (fixed, so "first registration wins" is predictable):
1. the built-ins in `DEFAULT_PLUGINS` (always, whatever `ERNIE_SERVE_PLUGINS` says);
2. third-party modules from the `ernie_serve` entry-point group, filtered by `ERNIE_SERVE_PLUGINS`.

A plugin that fails to import, declares an unknown hook (a typo such as `register_backend`), or raises in one
of its hooks is logged and skipped as a whole; the others still load. Nothing here imports torch.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from types import ModuleType
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import pluggy

from ernie_serve.core import hookspecs

if TYPE_CHECKING:
    from ernie_serve.core.backend import Backend
    from ernie_serve.core.scheduler import Scheduler

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "ernie_serve"
ALLOWLIST_ENV = "ERNIE_SERVE_PLUGINS"
DEFAULT_PLUGINS: tuple[str, ...] = (
    "ernie_serve.plugins.schedulers",
    "ernie_serve.backends.torch.plugin",
    "ernie_serve.backends.onnx.plugin",
    "ernie_serve.plugins.web_search",
)
_OWN_DISTRIBUTION = "ernie-serve"

T = TypeVar("T")


class UnknownPluginError(KeyError):
    """A backend, scheduler or model name that no plugin registered; the message lists the known names."""

    def __str__(self) -> str:
        # KeyError's str() is the repr of its argument (quoted); callers print this as one readable line.
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Registration(Generic[T]):
    """One thing a plugin registered, and where it came from (shown by `ernie-serve plugins`)."""

    name: str  # the key: backend/scheduler name, architecture name, route path or transform name
    obj: T  # the class (or route object, or callable) that was registered
    provider: str  # plugin name: the module name for built-ins, the entry-point name for third-party ones
    distribution: str | None  # e.g. "ernie-serve"; None when unknown (a module registered by hand)
    version: str | None  # the distribution's version


@dataclass(frozen=True)
class PluginInfo:
    """A plugin module that loaded and whose hooks all ran."""

    name: str
    module: str
    distribution: str | None
    version: str | None
    builtin: bool


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that was skipped, and why (one line)."""

    name: str
    distribution: str | None
    version: str | None
    error: str


@dataclass
class Registry:
    """Everything the loaded plugins registered. Built once per process by `registry()`."""

    backends: dict[str, Registration[type[Backend]]] = field(default_factory=dict)
    schedulers: dict[str, Registration[type[Scheduler]]] = field(default_factory=dict)
    models: dict[str, Registration[type]] = field(default_factory=dict)  # architecture name -> model class
    gateway_routes: list[Registration[Any]] = field(default_factory=list)  # name = the route's path
    request_transforms: dict[str, Registration[Callable[[Any], Any]]] = field(default_factory=dict)
    plugins: list[PluginInfo] = field(default_factory=list)  # in load order
    failures: list[PluginFailure] = field(default_factory=list)


@dataclass
class _Loaded:
    """A registered plugin object with its provenance, in load order (pluggy keeps plugins in a set)."""

    name: str
    plugin: Any
    distribution: str | None
    version: str | None
    builtin: bool


_lock = threading.RLock()
_pm: pluggy.PluginManager | None = None
_loaded: list[_Loaded] = []
_failures: list[PluginFailure] = []
_registry: Registry | None = None


def _allowlist() -> set[str] | None:
    """`ERNIE_SERVE_PLUGINS=a,b`: only these third-party plugins; set but empty: none; unset: all."""
    raw = os.environ.get(ALLOWLIST_ENV)
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def _own_version() -> str | None:
    try:
        return metadata.version(_OWN_DISTRIBUTION)
    except metadata.PackageNotFoundError:  # running from a source tree without installing
        return None


def _fail(name: str, dist: str | None, version: str | None, error: str) -> None:
    where = f" (from {dist} {version})" if dist else ""
    logger.warning(
        "plugin %r%s skipped: %s",
        name,
        where,
        error,
        extra={"plugin": name, "distribution": dist, "plugin_error": error},
    )
    _failures.append(PluginFailure(name=name, distribution=dist, version=version, error=error))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _register(pm: pluggy.PluginManager, loaded: _Loaded) -> None:
    """Register one plugin object; any pluggy validation error (bad hook signature) skips the plugin."""
    if pm.is_registered(loaded.plugin):
        # The same module declared twice (e.g. a built-in also listed as an entry point): keep the first.
        logger.info("plugin %r is already registered as %r", loaded.name, pm.get_name(loaded.plugin))
        return
    try:
        pm.register(loaded.plugin, name=loaded.name)
    except (ValueError, pluggy.PluginValidationError) as exc:
        _fail(loaded.name, loaded.distribution, loaded.version, _describe(exc))
        return
    _loaded.append(loaded)


def _load_builtins(pm: pluggy.PluginManager) -> None:
    version = _own_version()
    for module_name in DEFAULT_PLUGINS:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # a broken built-in must not take the whole CLI down
            _fail(module_name, _OWN_DISTRIBUTION, version, _describe(exc))
            continue
        _register(pm, _Loaded(module_name, module, _OWN_DISTRIBUTION, version, builtin=True))


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    allow = _allowlist()
    found: set[str] = set()
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        ep_dist = getattr(ep, "dist", None)  # set by importlib.metadata on Python >= 3.10
        dist = ep_dist.name if ep_dist is not None else None
        version = ep_dist.version if ep_dist is not None else None
        found.add(ep.name)
        if allow is not None and ep.name not in allow:
            logger.debug("plugin %r not in %s; not loaded", ep.name, ALLOWLIST_ENV)
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # import errors, missing optional deps, syntax errors in the plugin
            _fail(ep.name, dist, version, _describe(exc))
            continue
        _register(pm, _Loaded(ep.name, plugin, dist, version, builtin=False))
    for missing in sorted((allow or set()) - found):
        logger.warning("%s names plugin %r, but no installed distribution provides it", ALLOWLIST_ENV, missing)


def _drop_pending(pm: pluggy.PluginManager) -> None:
    """`check_pending` reports one unknown hook at a time: unregister each offender until none is left."""
    while True:
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            plugin = exc.plugin
            entry = next((e for e in _loaded if e.plugin is plugin), None)
            name = entry.name if entry else str(pm.get_name(plugin))
            # pluggy's message names the typo'd hook, e.g. "unknown hook 'register_backend' in plugin ...".
            _fail(name, entry.distribution if entry else None, entry.version if entry else None, str(exc))
            pm.unregister(plugin)
            _loaded[:] = [e for e in _loaded if e.plugin is not plugin]
        else:
            return


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with every loadable plugin registered and validated.

    Called lazily by `registry()` (and by anything that wants to call a hook directly). The first call
    imports the plugins; later calls return the same manager until `reset_plugin_manager()`.
    """
    global _pm
    with _lock:
        if _pm is None:
            pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
            pm.add_hookspecs(hookspecs)
            _load_builtins(pm)
            _load_entry_points(pm)
            _drop_pending(pm)
            _pm = pm
        return _pm


def reset_plugin_manager() -> None:
    """Forget the loaded plugins and the registry, so the next call rediscovers them. For tests (after
    changing `sys.path` or `ERNIE_SERVE_PLUGINS`); already-imported plugin modules stay in `sys.modules`."""
    global _pm, _registry
    with _lock:
        _pm = None
        _registry = None
        _loaded.clear()
        _failures.clear()
        # importlib.metadata's path finders cache directory listings; a new *.dist-info must be seen.
        importlib.invalidate_caches()


def _check_class(kind: str, name: Any, obj: Any, base: type | None) -> None:
    """Reject bad registrations with a TypeError, which skips the registering plugin with that message."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"{kind} name must be a non-empty string, got {name!r}")
    if not isinstance(obj, type):
        raise TypeError(f"{kind} {name!r} must be registered as a class, got {obj!r}")
    if base is not None and not issubclass(obj, base):
        raise TypeError(f"{kind} {name!r}: {obj.__qualname__} is not a subclass of {base.__qualname__}")


class _Collector:
    """The `register` callbacks handed to one plugin's hooks; buffered so a failing plugin adds nothing."""

    def __init__(self, entry: _Loaded) -> None:
        self.entry = entry
        self.items: list[tuple[str, str, Any]] = []  # (kind, name, obj) in call order

    def _record(self, kind: str, name: str, obj: Any) -> None:
        self.items.append((kind, name, obj))

    def backend(self, name: str, backend_cls: type[Backend]) -> None:
        from ernie_serve.core.backend import Backend

        _check_class("backend", name, backend_cls, Backend)
        self._record("backends", name, backend_cls)

    def scheduler(self, name: str, scheduler_cls: type[Scheduler]) -> None:
        # Imported here: the scheduler module pulls in request/plan types, not needed to load plugins.
        from ernie_serve.core.scheduler import Scheduler

        _check_class("scheduler", name, scheduler_cls, Scheduler)
        self._record("schedulers", name, scheduler_cls)

    def model(self, architecture_name: str, model_cls: type) -> None:
        _check_class("model", architecture_name, model_cls, None)
        self._record("models", architecture_name, model_cls)

    def route(self, route: Any) -> None:
        path = getattr(route, "path", None)
        if not isinstance(path, str):
            raise TypeError(f"gateway route must have a string `path` attribute, got {route!r}")
        self._record("gateway_routes", path, route)

    def request_transform(self, name: str, transform: Callable[[Any], Any]) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"request transform name must be a non-empty string, got {name!r}")
        if not callable(transform):
            raise TypeError(f"request transform {name!r} must be callable, got {transform!r}")
        self._record("request_transforms", name, transform)


def _hook_calls(collector: _Collector) -> Iterable[tuple[str, dict[str, Any]]]:
    yield "register_backends", {"register": collector.backend}
    yield "register_schedulers", {"register": collector.scheduler}
    yield "register_models", {"register": collector.model}
    yield "register_gateway_routes", {"register": collector.route}
    yield "register_request_transforms", {"register": collector.request_transform}


def _run_plugin_hooks(pm: pluggy.PluginManager, entry: _Loaded) -> _Collector | None:
    """Call every hook the plugin implements; None (and the plugin skipped) if one of them raises."""
    collector = _Collector(entry)
    for hook_name, kwargs in _hook_calls(collector):
        caller = getattr(pm.hook, hook_name)
        for impl in caller.get_hookimpls():
            if impl.plugin is not entry.plugin:
                continue
            try:
                # Called per plugin rather than through pm.hook so one plugin's exception is attributable
                # and does not stop the others; hookimpls may take a subset of the spec's arguments.
                impl.function(*[kwargs[arg] for arg in impl.argnames])
            except Exception as exc:
                _fail(entry.name, entry.distribution, entry.version, f"{hook_name}: {_describe(exc)}")
                return None
    return collector


def _merge(reg: Registry, collector: _Collector) -> None:
    entry = collector.entry
    for kind, name, obj in collector.items:
        item = Registration(name, obj, entry.name, entry.distribution, entry.version)
        if kind == "gateway_routes":
            reg.gateway_routes.append(item)
            continue
        table: dict[str, Registration[Any]] = getattr(reg, kind)
        if name in table:
            first = table[name]
            logger.warning(
                "%s %r registered by %r is ignored: already registered by %r",
                kind.rstrip("s"),
                name,
                entry.name,
                first.provider,
                extra={"plugin": entry.name, "registered_by": first.provider},
            )
            continue
        table[name] = item


def registry() -> Registry:
    """What every loaded plugin registered, built on first call (this runs the plugins' hooks).

    Called by the engine when it resolves `--backend` / `--scheduler` / an architecture, by the gateway for
    routes and transforms, and by `ernie-serve plugins`.
    """
    global _registry
    with _lock:
        if _registry is None:
            pm = get_plugin_manager()
            reg = Registry()
            for entry in list(_loaded):
                collector = _run_plugin_hooks(pm, entry)
                if collector is None:
                    pm.unregister(entry.plugin)
                    _loaded.remove(entry)
                    continue
                _merge(reg, collector)
            reg.plugins = [
                PluginInfo(e.name, _module_name(e.plugin), e.distribution, e.version, e.builtin) for e in _loaded
            ]
            reg.failures = list(_failures)
            _registry = reg
        return _registry


def _module_name(plugin: Any) -> str:
    if isinstance(plugin, ModuleType):
        return plugin.__name__
    return getattr(plugin, "__module__", None) or type(plugin).__module__


def _lookup(kind: str, table: dict[str, Registration[Any]], name: str) -> Any:
    try:
        return table[name].obj
    except KeyError:
        known = ", ".join(sorted(table)) or "none"
        raise UnknownPluginError(
            f"unknown {kind} {name!r}; registered {kind}s: {known} (see `ernie-serve plugins`)"
        ) from None


def get_backend_class(name: str) -> type[Backend]:
    """The backend class registered as `name` (what `--backend` selects); `UnknownPluginError` if none."""
    return _lookup("backend", registry().backends, name)


def get_scheduler_class(name: str) -> type[Scheduler]:
    """The scheduler class registered as `name` (what `--scheduler` selects); `UnknownPluginError` if none."""
    return _lookup("scheduler", registry().schedulers, name)


def get_model_class(architecture: str) -> type:
    """The torch model class for a config.json architecture name; `UnknownPluginError` if none."""
    return _lookup("model architecture", registry().models, architecture)
