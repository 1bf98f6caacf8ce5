"""`ernie-serve plugins` output, from a registry built by hand: provenance, availability, capabilities, options."""

from __future__ import annotations

import io
import json
from typing import Any, ClassVar

from pydantic import Field

from ernie_serve.core.backend import Backend, BackendCapabilities, BackendOptions, unavailable_backend
from ernie_serve.core.plugins import PluginInfo, Registration, Registry
from ernie_serve.core.scheduler import FCFSScheduler
from ernie_serve.plugin_report import plugins_json, write_report


class FrobOptions(BackendOptions):
    frob_level: int = Field(3, description="how hard to frob")
    frob_cache_dir: str | None = None


class FrobBackend(Backend):
    capabilities: ClassVar[BackendCapabilities] = BackendCapabilities(
        prefix_caching=False, quantization=("wint8", "wint4"), tensor_parallel=True, devices=("cpu", "cuda")
    )
    options_class: ClassVar[type[BackendOptions]] = FrobOptions

    def load(self, model_config: Any, settings: Any, model_path: Any, options: Any) -> None: ...
    def kv_cache_spec(self) -> Any: ...
    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None: ...
    def execute(self, plan: Any) -> Any: ...


class BrokenCheckBackend(FrobBackend):
    @classmethod
    def availability(cls) -> str | None:
        raise RuntimeError("probe crashed")


FROB = PluginInfo("frob", "frob_pkg.plugin", "frob-serve", "1.2")
OURS = PluginInfo("schedulers", "ernie_serve.plugins.schedulers", "ernie-serve", "0.1.0")


def _registry() -> Registry:
    def by(info: PluginInfo, name: str, obj: Any) -> Registration[Any]:
        return Registration(name, obj, info.name, info.distribution, info.version)

    reg = Registry()
    reg.backends["frob"] = by(FROB, "frob", FrobBackend)
    reg.backends["gpu-only"] = by(FROB, "gpu-only", unavailable_backend("gpu-only", "needs an NVIDIA GPU"))
    reg.backends["shaky"] = by(FROB, "shaky", BrokenCheckBackend)
    reg.schedulers["fcfs"] = by(OURS, "fcfs", FCFSScheduler)
    reg.grammar_backends["frobgrammar"] = by(FROB, "frobgrammar", FrobBackend)  # any class: not checked here
    reg.plugins = [OURS, FROB]
    reg.failures = [PluginInfo("bad", "bad_pkg", None, None, error="ImportError: no libbad")]
    return reg


def test_text_report() -> None:
    out = io.StringIO()
    write_report(_registry(), out)
    assert out.getvalue() == (
        "Backends:\n"
        "  frob      frob-serve 1.2 [frob]  available\n"
        "            prefix caching: no; quantization: wint8, wint4; tensor parallel: yes; devices: cpu, cuda\n"
        "            options: --frob-level, --frob-cache-dir\n"
        "  gpu-only  frob-serve 1.2 [frob]  unavailable: needs an NVIDIA GPU\n"
        "            prefix caching: yes; quantization: none; tensor parallel: no; devices: cpu\n"
        "            options: none\n"
        "  shaky     frob-serve 1.2 [frob]  unavailable: availability check failed: RuntimeError: probe crashed\n"
        "            prefix caching: no; quantization: wint8, wint4; tensor parallel: yes; devices: cpu, cuda\n"
        "            options: --frob-level, --frob-cache-dir\n"
        "Schedulers:\n"
        "  fcfs  ernie-serve 0.1.0 [schedulers]\n"
        "Models (torch backend architectures):\n"
        "  (none)\n"
        "Grammar backends (structured output):\n"
        "  frobgrammar  frob-serve 1.2 [frob]\n"
        "Plugins (entry points in group ernie_serve, in load order):\n"
        "  schedulers  ernie-serve 0.1.0 [schedulers]  ernie_serve.plugins.schedulers (built-in)\n"
        "  frob        frob-serve 1.2 [frob]           frob_pkg.plugin\n"
        "Failed plugins (skipped):\n"
        "  bad  unknown distribution [bad]  ImportError: no libbad\n"
    )


def test_json_report() -> None:
    doc = json.loads(json.dumps(plugins_json(_registry())))  # must be JSON-serialisable as is

    frob = doc["backends"][0]
    assert frob == {
        "name": "frob",
        "object": f"{__name__}.FrobBackend",
        "provider": "frob",
        "distribution": "frob-serve",
        "version": "1.2",
        "available": True,
        "reason": None,
        "capabilities": {
            "prefix_caching": False,
            "quantization": ["wint8", "wint4"],
            "tensor_parallel": True,
            "devices": ["cpu", "cuda"],
        },
        "options": [
            {"name": "frob_level", "flag": "--frob-level", "help": "how hard to frob"},
            {"name": "frob_cache_dir", "flag": "--frob-cache-dir", "help": None},
        ],
    }
    assert [(b["name"], b["available"], b["reason"]) for b in doc["backends"][1:]] == [
        ("gpu-only", False, "needs an NVIDIA GPU"),
        ("shaky", False, "availability check failed: RuntimeError: probe crashed"),
    ]
    assert [(g["name"], g["provider"]) for g in doc["grammar_backends"]] == [("frobgrammar", "frob")]
    assert [p["name"] for p in doc["plugins"]] == ["schedulers", "frob"]
    assert doc["plugins"][0] == {
        "name": "schedulers",
        "module": "ernie_serve.plugins.schedulers",
        "distribution": "ernie-serve",
        "version": "0.1.0",
        "error": None,
        "builtin": True,
    }
    assert doc["failed_plugins"] == [
        {
            "name": "bad",
            "module": "bad_pkg",
            "distribution": None,
            "version": None,
            "error": "ImportError: no libbad",
            "builtin": False,
        }
    ]
