"""Plugin discovery through real entry points: tiny distributions written to tmp_path at run time."""

from __future__ import annotations

import logging
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from ernie_serve.core import plugins
from ernie_serve.core.plugins import UnknownPluginError

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

    def dist(self, dist_name: str, version: str, entry_points: dict[str, str]) -> None:
        info = self.root / f"{dist_name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
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


def _failure(name: str) -> plugins.PluginFailure:
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
    assert (info.module, info.builtin) == ("frob_plugin", False)
    assert not reg.failures


def test_builtins_are_registered_like_plugins(dists: DistFactory) -> None:
    reg = plugins.registry()

    fcfs = reg.schedulers["fcfs"]
    assert fcfs.obj.__name__ == "FCFSScheduler"
    assert (fcfs.provider, fcfs.distribution) == ("ernie_serve.plugins.schedulers", "ernie-serve")
    assert plugins.get_scheduler_class("fcfs") is fcfs.obj
    # Needs the lead's ernie_serve.backends.torch.backend / .model modules.
    assert reg.backends["torch"].provider == "ernie_serve.backends.torch.plugin"
    assert reg.backends["torch"].obj.__name__ == "TorchBackend"
    assert plugins.get_model_class("Ernie4_5_MoeForCausalLM") is plugins.get_model_class("Ernie4_5ForCausalLM")
    assert {p.name for p in reg.plugins if p.builtin} == set(plugins.DEFAULT_PLUGINS)


def test_allowlist_loads_only_listed_plugins(dists: DistFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    dists.backend_module("alpha_plugin", backend="alpha")
    dists.backend_module("beta_plugin", backend="beta")
    dists.dist("alpha-dist", "1.0", {"alpha": "alpha_plugin"})
    dists.dist("beta-dist", "1.0", {"beta": "beta_plugin"})
    monkeypatch.setenv("ERNIE_SERVE_PLUGINS", " alpha , ")

    reg = plugins.registry()

    assert "alpha" in reg.backends
    assert "beta" not in reg.backends
    assert "fcfs" in reg.schedulers  # built-ins load whatever the allowlist says
    assert "beta_plugin" not in sys.modules  # not even imported


def test_empty_allowlist_loads_no_third_party_plugins(dists: DistFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    dists.backend_module("alpha_plugin", backend="alpha")
    dists.dist("alpha-dist", "1.0", {"alpha": "alpha_plugin"})
    monkeypatch.setenv("ERNIE_SERVE_PLUGINS", "")

    reg = plugins.registry()

    assert "alpha" not in reg.backends
    assert all(p.builtin for p in reg.plugins)
    assert "fcfs" in reg.schedulers


def test_allowlisted_plugin_that_is_not_installed_is_logged(
    dists: DistFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("ERNIE_SERVE_PLUGINS", "ghost")
    with caplog.at_level(logging.WARNING, logger=PLUGIN_LOGGER):
        plugins.registry()
    assert "'ghost'" in caplog.text


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

    assert "register_backend" in _failure("typo").error
    assert "register_backend" in caplog.text and "'typo'" in caplog.text
    assert "good" in reg.backends
    assert all(p.name != "typo" for p in reg.plugins)
    assert plugins.get_plugin_manager().get_plugin("typo") is None


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


def test_registering_a_non_backend_class_skips_the_plugin(dists: DistFactory) -> None:
    dists.module(
        "wrong_plugin",
        """
        from ernie_serve.core.hookspecs import hookimpl

        class NotABackend:
            pass

        @hookimpl
        def register_backends(register):
            register("wrong", NotABackend)
        """,
    )
    dists.dist("wrong-dist", "0.1", {"wrong": "wrong_plugin"})

    reg = plugins.registry()

    assert "wrong" not in reg.backends
    assert "not a subclass of Backend" in _failure("wrong").error


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

    assert reg.schedulers["fcfs"].provider == "ernie_serve.plugins.schedulers"
    assert reg.schedulers["my-fcfs"].provider == "dup"
    assert "'dup'" in caplog.text and "'ernie_serve.plugins.schedulers'" in caplog.text


def test_unknown_names_list_what_is_available(dists: DistFactory) -> None:
    with pytest.raises(UnknownPluginError) as excinfo:
        plugins.get_scheduler_class("round-robin")
    assert isinstance(excinfo.value, KeyError)
    assert "round-robin" in str(excinfo.value) and "fcfs" in str(excinfo.value)
    with pytest.raises(UnknownPluginError, match="torch"):
        plugins.get_backend_class("tensorrt")
    with pytest.raises(UnknownPluginError, match="Ernie4_5_MoeForCausalLM"):
        plugins.get_model_class("LlamaForCausalLM")


def test_registry_is_cached_until_reset(dists: DistFactory) -> None:
    first = plugins.registry()
    assert plugins.registry() is first
    assert plugins.get_plugin_manager() is plugins.get_plugin_manager()
    dists.backend_module("late_plugin", backend="late")
    dists.dist("late-dist", "1.0", {"late": "late_plugin"})
    assert "late" not in plugins.registry().backends
    plugins.reset_plugin_manager()
    assert "late" in plugins.registry().backends
