"""The torch backend's declared capabilities and its own options."""

from __future__ import annotations

import pytest
import torch

from ernie_serve.backends.torch.backend import TorchBackend, TorchOptions
from ernie_serve.backends.torch.model import _onednn_linear_available
from ernie_serve.core.config import EngineSettings
from ernie_serve.models import read_model_config


def test_capabilities_and_options_are_declared_on_the_class() -> None:
    capabilities = TorchBackend.capabilities
    assert capabilities.prefix_caching and capabilities.devices == ("cpu", "cuda")
    assert capabilities.quantization == ("wint8", "wint4") and capabilities.tensor_parallel
    assert TorchBackend.options_class is TorchOptions
    fields = {
        "cpu_weight_prepack",
        "int8_activations",
        "exact_quantized_kernels",
        "cpu_quantized_kernels",
        "quantize_lm_head",
        "cpu_malloc_trim_interval",
        "enable_expert_parallel",
    }
    assert set(TorchOptions.model_fields) == fields


@pytest.mark.skipif(not _onednn_linear_available(), reason="this torch has no oneDNN linear kernels")
@pytest.mark.parametrize("prepack", [True, False])
def test_cpu_weight_prepack_option_decides_the_onednn_copies(tiny_checkpoint, prepack: bool) -> None:
    checkpoint = tiny_checkpoint("moe_shared_tied", torch.bfloat16)
    backend = TorchBackend()
    settings = EngineSettings(model=str(checkpoint), device="cpu")
    backend.load(read_model_config(checkpoint), settings, str(checkpoint), TorchOptions(cpu_weight_prepack=prepack))
    assert backend.model is not None
    assert (backend.model.lm_head_packed is not None) == prepack
    backend.close()


def test_the_option_is_read_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("ERNIE_SERVE_CPU_WEIGHT_PREPACK", "0")
    assert TorchOptions().cpu_weight_prepack is False
    assert TorchOptions(cpu_weight_prepack=True).cpu_weight_prepack is True  # a given value beats the env


def test_plugins_listing_shows_how_the_model_is_split() -> None:
    import io

    from ernie_serve.core.plugins import registry
    from ernie_serve.plugin_report import write_report

    out = io.StringIO()
    write_report(registry(), out)
    for line in TorchBackend.parallel_layout():
        assert line in out.getvalue()
    assert "torchrun" in TorchBackend.parallel_layout()[0] and "--enable-expert-parallel" in out.getvalue()
