"""The torch backend's plugin: registers the backend and the ERNIE 4.5 architectures it runs."""

from __future__ import annotations

from ernie_serve.core.hookspecs import RegisterBackend, RegisterModel, hookimpl


@hookimpl
def register_backends(register: RegisterBackend) -> None:
    """Called once when the plugin registry is built: registers the native PyTorch backend as "torch"."""
    # Imported inside the hook: the plugin manager loads this module for every CLI command, and the
    # backend module imports torch, which `ernie-serve plugins` and the scheduler tests should not pay for
    # until the registry is actually built.
    from ernie_serve.backends.torch.backend import TorchBackend

    register("torch", TorchBackend)


@hookimpl
def register_models(register: RegisterModel) -> None:
    """Called once when the plugin registry is built: maps both ERNIE 4.5 config.json architectures (dense
    and MoE) to the single model class, which reads `ModelConfig.is_moe` to build its MLP layers."""
    from ernie_serve.backends.torch.model import ErnieForCausalLM

    register("Ernie4_5ForCausalLM", ErnieForCausalLM)
    register("Ernie4_5_MoeForCausalLM", ErnieForCausalLM)
