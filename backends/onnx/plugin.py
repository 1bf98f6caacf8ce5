"""The onnx backend's plugin: registers the backend as "onnx" (listed even when onnxruntime is missing)."""

from __future__ import annotations

from ernie_serve.core.hookspecs import RegisterBackend, hookimpl


@hookimpl
def register_backends(register: RegisterBackend) -> None:
    """Called once when the plugin registry is built: registers the ONNX Runtime backend as "onnx"."""
    # The backend module needs numpy, which only the onnx extra installs; onnx and onnxruntime are imported
    # when it loads a model. Either way the backend is listed, and `availability()` names what is missing.
    try:
        from ernie_serve.backends.onnx.backend import OnnxBackend
    except ImportError as missing:
        from ernie_serve.core.backend import unavailable_backend

        reason = f"needs {missing.name or 'numpy'}: pip install 'ernie-serve[onnx]'"
        register("onnx", unavailable_backend("onnx", reason))
        return
    register("onnx", OnnxBackend)
