"""The onnx backend's plugin: registers the backend as "onnx" (listed even when onnxruntime is missing)."""

from __future__ import annotations

from ernie_serve.core.hookspecs import RegisterBackend, hookimpl


@hookimpl
def register_backends(register: RegisterBackend) -> None:
    """Called once when the plugin registry is built: registers the ONNX Runtime backend as "onnx"."""
    # The backend module imports numpy only; onnx and onnxruntime are imported when it loads a model, and
    # `OnnxBackend.availability()` names the missing package when they are absent.
    from ernie_serve.backends.onnx.backend import OnnxBackend

    register("onnx", OnnxBackend)
