"""Plugin discovery through real entry points: tiny distributions written to tmp_path at run time."""

from __future__ import annotations

import ast
import logging
import sys
import textwrap
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

import ernie_serve.core
from ernie_serve.core import plugins
from ernie_serve.core.plugins import UnknownPluginError

# the built-in plugins as the registry lists them: by name, before any third-party one
BUILTIN_PLUGINS = ["ernie45", "llguidance", "onnx", "schedulers", "tensorrt", "torch", "web_search"]

# A complete (if useless) backend, so registering it passes the Backend subclass check.
# It imports `hookimpl` the way DESIGN.md tells third-party authors to.
BACKEND_SOURCE = """
from ernie_serve import hookimpl
from ernie_serve.core.backend import Backend


class {cls}(Backend):
    @classmethod
    def availability(cls):
        return "needs the frobnicator: pip install frob"

    def load(self, model_config, settings, model_path):
        pass

    def kv_cache_spec(self):
        raise NotImplementedError

    def allocate_kv_cache(self, num_blocks, block_size):
        pass

    def execute(self, plan):
        raise NotImplementedError


class {cls}Model:
    pass


@hookimpl
def register_backends(register):
    register("{backend}", {cls})


@hookimpl
def register_models(register):
    register("{cls}Arch", {cls}Model)
"""

PLUGIN_LOGGER = "ernie_serve.core.plugins"


class DistFactory:
    """Writes installed-looking distributions (module + *.dist-info) into a directory on sys.path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules: list[str] = []

    def module(self, name: str, source: str) -> None:
        (self.root / f"{name}.py").write_text(textwrap.dedent(source))
        self.modules.append(name)

    def backend_module(self, name: str, backend: str) -> None:
        self.module(name, BACKEND_SOURCE.format(cls=name.title().replace("_", ""), backend=backend))

    def dist(self, dist_name: str, version: str, entry_points: dict[str, str], root: Path | None = None) -> None:
        """`root`: another directory on sys.path (default: the factory's own)."""
        info = (root or self.root) / f"{dist_name.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: {version}\n")
        lines = ["[ernie_serve]"] + [f"{name} = {target}" for name, target in entry_points.items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def dists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DistFactory]:
    monkeypatch.delenv("ERNIE_SERVE_PLUGINS", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    factory = DistFactory(tmp_path)
    plugins.reset_plugin_manager()
    yield factory
    plugins.reset_plugin_manager()
    # Module names repeat across tests with different contents: drop them so the next test re-imports.
    for name in factory.modules:
        sys.modules.pop(name, None)


def _failure(name: str) -> plugins.PluginInfo:
    matches = [f for f in plugins.registry().failures if f.name == name]
    assert matches, f"no failure recorded for {name!r}: {plugins.registry().failures}"
    return matches[0]


def test_third_party_plugin_registers_with_its_distribution(dists: DistFactory) -> None:
    dists.backend_module("frob_plugin", backend="frob")
    dists.dist("frob-serve", "1.2.3", {"frob": "frob_plugin"})

    reg = plugins.registry()

    backend = reg.backends["frob"]
    assert backend.obj.__name__ == "FrobPlugin"
    assert (backend.provider, backend.distribution, backend.version) == ("frob", "frob-serve", "1.2.3")
    assert plugins.get_backend_class("frob") is backend.obj
    assert plugins.get_model_class("FrobPluginArch").__name__ == "FrobPluginModel"
    info = next(p for p in reg.plugins if p.name == "frob")
    assert (info.module, info.builtin, info.error) == ("frob_plugin", False, None)
    assert not reg.failures


def test_builtins_come_from_our_own_entry_points(dists: DistFactory) -> None:
    reg = plugins.registry()

    version = metadata.version("ernie-serve")
    declared = {
        ep.name: ep.value for ep in metadata.distribution("ernie-serve").entry_points if ep.group == "ernie_serve"
    }
    assert declared == {
        "schedulers": "ernie_serve.plugins.schedulers",
        "torch": "ernie_serve.backends.torch.plugin",
        "onnx": "ernie_serve.backends.onnx.plugin",
        "tensorrt": "ernie_serve.backends.tensorrt.plugin",
        "web_search": "ernie_serve.plugins.web_search",
        "llguidance": "ernie_serve.plugins.llguidance_grammar",
        "ernie45": "ernie_serve.plugins.ernie45",
    }
    assert [(p.name, p.module, p.version) for p in reg.plugins] == [
        (name, declared[name], version) for name in sorted(declared)
    ]
    assert all(p.builtin and p.distribution == "ernie-serve" for p in reg.plugins)
    fcfs = reg.schedulers["fcfs"]
    assert fcfs.obj.__name__ == "FCFSScheduler"
    assert (fcfs.provider, fcfs.distribution, fcfs.version) == ("schedulers", "ernie-serve", version)
    assert plugins.get_scheduler_class("fcfs") is fcfs.obj
    assert (reg.backends["torch"].provider, reg.backends["torch"].obj.__name__) == ("torch", "TorchBackend")
    assert reg.backends["onnx"].provider == "onnx"
    assert reg.request_transforms["ernie_web_search"].provider == "web_search"
    # reasoning and tool-call parsers share names: the registry keys them by kind
    assert {name: r.provider for name, r in reg.parsers.items()} == {
        f"{kind}:{name}": "ernie45" for kind in ("reasoning", "tool_call") for name in ("ernie45", "ernie-x1")
    }
    assert plugins.get_grammar_backend_class("llguidance").__name__ == "LLGuidanceBackend"
    assert plugins.get_model_class("Ernie4_5_MoeForCausalLM") is plugins.get_model_class("Ernie4_5ForCausalLM")


def test_core_has_no_list_of_builtins(dists: DistFactory) -> None:
    # An ernie-serve whose metadata declares only the schedulers (found first on sys.path, so importlib.metadata
    # takes it for the installed one) gets only the schedulers: nothing else is wired in by core.
    real = metadata.distribution("ernie-serve").entry_points
    builtin_modules = [ep.value for ep in real if ep.group == "ernie_serve"]
    assert "ernie_serve.backends.torch.plugin" in builtin_modules
    dists.dist("ernie-serve", "9.9", {"schedulers": "ernie_serve.plugins.schedulers"})

    reg = plugins.registry()

    assert [(p.name, p.version, p.builtin) for p in reg.plugins] == [("schedulers", "9.9", True)]
    assert set(reg.schedulers) == {"fcfs", "priority"}
    assert not reg.backends and not reg.models and not reg.request_transforms
    # And no string in core's code (docstrings and comments aside) names a built-in plugin module.
    for source in Path(ernie_serve.core.__file__).parent.glob("*.py"):
        for text in _code_strings(ast.parse(source.read_text())):
            assert not any(module in text for module in builtin_modules), f"{source.name}: {text!r}"


def _code_strings(tree: ast.Module) -> list[str]:
    scopes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, scopes) and node.body and isinstance(node.body[0], ast.Expr)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_allowlist_loads_only_listed_plugins(dists: DistFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    dists.backend_module("alpha_plugin", backend="alpha")
    dists.backend_module("beta_plugin", backend="beta")
    dists.dist("alpha-dist", "1.0", {"alpha": "alpha_plugin"})
    dists.dist("beta-dist", "1.0", {"beta": "beta_plugin"})
    monkeypatch.setenv("ERNIE_SERVE_PLUGINS", " alpha , ")

    reg = plugins.registry()

    assert "alpha" in reg.backends
    assert "beta" not in reg.backends
    assert "beta_plugin" not in sys.modules  # not even imported
    # built-ins load whatever the allowlist says
    assert [p.name for p in reg.plugins] == [*BUILTIN_PLUGINS, "alpha"]


def test_empty_allowlist_loads_no_third_party_plugins(dists: DistFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    dists.backend_module("alpha_plugin", backend="alpha")
    dists.dist("alpha-dist", "1.0", {"alpha": "alpha_plugin"})
    monkeypatch.setenv("ERNIE_SERVE_PLUGINS", "")

    reg = plugins.registry()

    assert "alpha" not in reg.backends
    assert [p.name for p in reg.plugins] == BUILTIN_PLUGINS


def test_allowlisted_plugin_that_is_not_installed_is_logged(
    dists: DistFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("ERNIE_SERVE_PLUGINS", "ghost")
    with caplog.at_level(logging.WARNING, logger=PLUGIN_LOGGER):
        plugins.registry()
    assert [r.getMessage() for r in caplog.records] == [
        "ERNIE_SERVE_PLUGINS names plugin 'ghost', but no installed distribution provides it"
    ]


def test_allowlisting_a_builtin_name_is_not_a_missing_plugin(
    dists: DistFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("ERNIE_SERVE_PLUGINS", "torch")
    with caplog.at_level(logging.WARNING, logger=PLUGIN_LOGGER):
        reg = plugins.registry()
    assert caplog.records == []
    assert "torch" in reg.backends


def test_third_party_plugins_load_after_builtins_sorted_by_distribution(
    dists: DistFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "zz-dist" sits in a directory earlier on sys.path, so discovery finds it first; the load order (and so
    # which "same" backend wins) must not depend on that.
    first_on_path = tmp_path / "first"
    monkeypatch.syspath_prepend(str(first_on_path))
    dists.backend_module("zz_plugin", backend="same")
    dists.backend_module("aa_plugin", backend="same")
    dists.dist("zz-dist", "1.0", {"a-plugin": "zz_plugin"}, root=first_on_path)
    dists.dist("aa-dist", "1.0", {"z-plugin": "aa_plugin", "b-plugin": "aa_plugin"})

    reg = plugins.registry()

    names = [p.name for p in reg.plugins]
    assert names == [*BUILTIN_PLUGINS, "b-plugin", "a-plugin"]
    assert (reg.backends["same"].provider, reg.backends["same"].distribution) == ("b-plugin", "aa-dist")
    # the same module under a second name is refused by the plugin manager, and reported
    assert "already registered" in _failure("z-plugin").error


def test_third_party_plugin_cannot_take_a_builtin_name(dists: DistFactory) -> None:
    dists.backend_module("fake_torch", backend="fake")
    dists.dist("fake-dist", "1.0", {"torch": "fake_torch"})

    reg = plugins.registry()

    assert reg.backends["torch"].obj.__name__ == "TorchBackend"
    assert "fake" not in reg.backends
    failure = _failure("torch")
    assert failure.distribution == "fake-dist" and "already registered" in failure.error


def test_plugin_failing_on_import_is_skipped_and_logged(dists: DistFactory, caplog: pytest.LogCaptureFixture) -> None:
    dists.module("broken_plugin", "raise ImportError('needs libfrob.so')\n")
    dists.backend_module("good_plugin", backend="good")
    dists.dist("broken-dist", "0.1", {"broken": "broken_plugin"})
    dists.dist("good-dist", "2.0", {"good": "good_plugin"})

    with caplog.at_level(logging.WARNING, logger=PLUGIN_LOGGER):
        reg = plugins.registry()

    assert "good" in reg.backends
    failure = _failure("broken")
    assert (failure.distribution, failure.version) == ("broken-dist", "0.1")
    assert "needs libfrob.so" in failure.error
    assert "'broken'" in caplog.text and "needs libfrob.so" in caplog.text


def test_hook_name_typo_is_reported_and_the_plugin_skipped(
    dists: DistFactory, caplog: pytest.LogCaptureFixture
) -> None:
    dists.module(
        "typo_plugin",
        """
        from ernie_serve.core.hookspecs import hookimpl

        @hookimpl
        def register_schedulers(register):
            raise AssertionError("a plugin with a typo must not run at all")

        @hookimpl
        def register_backend(register):  # typo: the hook is register_backends
            pass
        """,
    )
    dists.backend_module("good_plugin", backend="good")
    dists.dist("typo-dist", "0.1", {"typo": "typo_plugin"})
    dists.dist("good-dist", "2.0", {"good": "good_plugin"})

    with caplog.at_level(logging.WARNING, logger=PLUGIN_LOGGER):
        reg = plugins.registry()

    assert "unknown hook 'register_backend'" in _failure("typo").error
    assert "register_backend" in caplog.text and "'typo'" in caplog.text
    assert "good" in reg.backends
    assert all(p.name != "typo" for p in reg.plugins)


def test_plugin_raising_in_a_hook_is_skipped_entirely(dists: DistFactory, caplog: pytest.LogCaptureFixture) -> None:
    dists.module(
        "raising_plugin",
        """
        from ernie_serve.core.hookspecs import hookimpl

        class Model:
            pass

        @hookimpl
        def register_models(register):
            register("HalfDoneArch", Model)
            raise RuntimeError("config server unreachable")
        """,
    )
    dists.backend_module("good_plugin", backend="good")
    dists.dist("raising-dist", "0.1", {"raising": "raising_plugin"})
    dists.dist("good-dist", "2.0", {"good": "good_plugin"})

    with caplog.at_level(logging.WARNING, logger=PLUGIN_LOGGER):
        reg = plugins.registry()

    assert "HalfDoneArch" not in reg.models  # nothing from a failing plugin is kept
    assert "config server unreachable" in _failure("raising").error
    assert "config server unreachable" in caplog.text
    assert "good" in reg.backends


WRONG_REGISTRATIONS = """
from ernie_serve.core.backend import Backend
from ernie_serve.core.hookspecs import hookimpl


class NotABackend:
    pass


class BadCapabilities(Backend):
    capabilities = {{"prefix_caching": True}}


class BadOptions(Backend):
    options_class = dict


class Model:
    pass


@hookimpl
def register_models(register):
    register("Good", Model)  # must not survive the plugin's bad registration


@hookimpl
def {hook}(register):
    {call}
"""


@pytest.mark.parametrize(
    ("hook", "call", "message"),
    [
        ("register_backends", 'register("x", NotABackend)', "backend 'x' must be a subclass of Backend"),
        ("register_backends", 'register("x", BadCapabilities)', "backend 'x': `capabilities` must be a Backend"),
        ("register_backends", 'register("x", BadOptions)', "backend 'x': `options_class` must be a BackendOptions"),
        ("register_schedulers", 'register("x", NotABackend)', "scheduler 'x' must be a subclass of Scheduler"),
        ("register_models", 'register("x", Model())', "model 'x' must be a class"),
        ("register_models", 'register("", Model)', "model name must be a non-empty string"),
        ("register_grammar_backends", 'register("x", Model())', "grammar backend 'x' must be a class"),
        ("register_request_transforms", 'register("x", "text")', "request transform 'x' must be callable"),
        ("register_request_transforms", 'register("", print)', "request transform name must be a non-empty"),
        ("register_gateway_routes", "register(object())", "gateway route must have a string `path` attribute"),
    ],
)
def test_wrong_registrations_skip_the_plugin(dists: DistFactory, hook: str, call: str, message: str) -> None:
    dists.module("wrong_plugin", WRONG_REGISTRATIONS.format(hook=hook, call=call))
    dists.dist("wrong-dist", "0.1", {"wrong": "wrong_plugin"})

    reg = plugins.registry()

    assert "Good" not in reg.models  # nothing from a failing plugin is kept
    assert "x" not in reg.backends and "x" not in reg.schedulers and "x" not in reg.request_transforms
    assert "x" not in reg.models and "x" not in reg.grammar_backends
    assert _failure("wrong").error.startswith(f"{hook}: TypeError: {message}")


def test_routes_and_transforms_are_registered(dists: DistFactory) -> None:
    dists.module(
        "extras_plugin",
        """
        from ernie_serve.core.hookspecs import hookimpl

        class Route:
            path = "/frob"

        def shout(request):
            return request

        @hookimpl
        def register_gateway_routes(register):
            register(Route())

        @hookimpl
        def register_request_transforms(register):
            register("shout", shout)

        @hookimpl
        def register_schedulers():  # a hookimpl may take fewer arguments than the spec
            pass
        """,
    )
    dists.dist("extras-dist", "0.2", {"extras": "extras_plugin"})

    reg = plugins.registry()

    assert [(r.name, type(r.obj).__name__, r.provider) for r in reg.gateway_routes] == [("/frob", "Route", "extras")]
    assert reg.request_transforms["shout"].obj.__name__ == "shout"
    assert not reg.failures


def test_duplicate_name_first_registration_wins(dists: DistFactory, caplog: pytest.LogCaptureFixture) -> None:
    dists.module(
        "dup_plugin",
        """
        from ernie_serve.core.hookspecs import hookimpl
        from ernie_serve.core.scheduler import FCFSScheduler

        class MyFCFS(FCFSScheduler):
            pass

        @hookimpl
        def register_schedulers(register):
            register("fcfs", MyFCFS)
            register("my-fcfs", MyFCFS)
        """,
    )
    dists.dist("dup-dist", "0.1", {"dup": "dup_plugin"})

    with caplog.at_level(logging.WARNING, logger=PLUGIN_LOGGER):
        reg = plugins.registry()

    assert reg.schedulers["fcfs"].provider == "schedulers"
    assert reg.schedulers["my-fcfs"].provider == "dup"
    assert [r.getMessage() for r in caplog.records] == [
        "scheduler 'fcfs' registered by 'dup' is ignored: already registered by 'schedulers'"
    ]


def test_unknown_names_list_what_is_available(dists: DistFactory) -> None:
    with pytest.raises(UnknownPluginError) as excinfo:
        plugins.get_scheduler_class("round-robin")
    assert isinstance(excinfo.value, KeyError)
    assert "round-robin" in str(excinfo.value) and "fcfs" in str(excinfo.value)
    with pytest.raises(UnknownPluginError, match="torch"):
        plugins.get_backend_class("openvino")
    with pytest.raises(UnknownPluginError, match="Ernie4_5_MoeForCausalLM"):
        plugins.get_model_class("LlamaForCausalLM")


def test_registry_is_cached_until_reset(dists: DistFactory) -> None:
    first = plugins.registry()
    assert plugins.registry() is first
    dists.backend_module("late_plugin", backend="late")
    dists.dist("late-dist", "1.0", {"late": "late_plugin"})
    assert "late" not in plugins.registry().backends
    plugins.reset_plugin_manager()
    assert "late" in plugins.registry().backends
