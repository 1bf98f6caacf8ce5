"""Test helpers shipped with the package, so plugin authors can use them too.

- `checkpoints`: tiny real-format ERNIE 4.5 checkpoints written by transformers, and transformers' greedy
  tokens and logprobs as the reference.
- `conformance`: the backend conformance suite (`run_conformance("mybackend")`, or one pytest test per case
  with `BackendConformance` and `conformance_cases`).

Both need the test extra: `pip install 'ernie-serve[test]'`.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_LAZY = {
    "BackendConformance": "ernie_serve.testing.conformance",
    "ConformanceError": "ernie_serve.testing.conformance",
    "conformance_cases": "ernie_serve.testing.conformance",
    "run_conformance": "ernie_serve.testing.conformance",
}

__all__ = ["BackendConformance", "ConformanceError", "conformance_cases", "run_conformance"]

if TYPE_CHECKING:
    from ernie_serve.testing.conformance import (
        BackendConformance,
        ConformanceError,
        conformance_cases,
        run_conformance,
    )


def __getattr__(name: str) -> Any:
    # Lazy: importing `ernie_serve.testing.checkpoints` alone must not pull in the conformance suite.
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ernie_serve.testing' has no attribute {name!r}")
