"""The TensorRT backend (docs/backends.md)."""
