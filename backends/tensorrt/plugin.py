"""The tensorrt backend's plugin: registers the backend as "tensorrt" (listed even where TensorRT cannot run)."""

from __future__ import annotations

from ernie_serve.core.hookspecs import RegisterBackend, hookimpl


@hookimpl
def register_backends(register: RegisterBackend) -> None:
    """Called once when the plugin registry is built: registers the TensorRT backend as "tensorrt". Its module
    imports tensorrt only when it loads a model, so it is always listed, and `availability()` says what is missing
    (the tensorrt package, a CUDA GPU or its driver)."""
    from ernie_serve.backends.tensorrt.backend import TensorRTBackend

    register("tensorrt", TensorRTBackend)
