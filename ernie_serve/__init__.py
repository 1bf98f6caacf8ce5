"""ernie-serve: a plugin-based serving framework for ERNIE 4.5.

Public API: `LLM`, `SamplingParams` (with `StructuredOutputsParams`), `RequestOutput`, `CompletionOutput`, the
`Scheduler` / `FCFSScheduler`, `Backend`, `LogitsProcessor` and `GrammarBackend` interfaces for plugins, and
`hookimpl` to register them. Heavy modules (torch) load on first use,
so a plugin module that only needs `hookimpl` imports quickly.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from ernie_serve.core.hookspecs import hookimpl
from ernie_serve.core.sampling_params import SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"

_LAZY = {
    "LLM": "ernie_serve.llm",
    "Engine": "ernie_serve.engine",
    "EngineSettings": "ernie_serve.core.config",
    "ModelConfig": "ernie_serve.core.config",
    "RequestOutput": "ernie_serve.core.request",
    "CompletionOutput": "ernie_serve.core.request",
    "Logprob": "ernie_serve.core.request",
    "Request": "ernie_serve.core.request",
    "Scheduler": "ernie_serve.core.scheduler",
    "FCFSScheduler": "ernie_serve.core.scheduler",
    "PriorityScheduler": "ernie_serve.plugins.schedulers",
    "SchedulerConfig": "ernie_serve.core.scheduler",
    "Backend": "ernie_serve.core.backend",
    "KVCacheSpec": "ernie_serve.core.backend",
    "LogitsProcessor": "ernie_serve.core.sampler",
    "GrammarBackend": "ernie_serve.structured_output",
}

__all__ = ["SamplingParams", "StructuredOutputsParams", "hookimpl", "__version__", *_LAZY]

if TYPE_CHECKING:
    from ernie_serve.core.backend import Backend, KVCacheSpec
    from ernie_serve.core.config import EngineSettings, ModelConfig
    from ernie_serve.core.request import CompletionOutput, Logprob, Request, RequestOutput
    from ernie_serve.core.sampler import LogitsProcessor
    from ernie_serve.core.scheduler import FCFSScheduler, Scheduler, SchedulerConfig
    from ernie_serve.engine import Engine
    from ernie_serve.llm import LLM
    from ernie_serve.plugins.schedulers import PriorityScheduler
    from ernie_serve.structured_output import GrammarBackend


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ernie_serve' has no attribute {name!r}")
