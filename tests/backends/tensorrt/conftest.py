"""Fixtures for the TensorRT backend's tests: the stand-in `tensorrt` module, a tiny graph and small profiles."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

_FAKE = Path(__file__).with_name("fake_tensorrt.py")


def _fake_module() -> Any:
    """fake_tensorrt.py, imported once (tests import by file path, so not as a package module)."""
    name = "ernie_serve_tests_fake_tensorrt"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _FAKE)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture()
def trt(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The stand-in module as `tensorrt` for one test, reset (see fake_tensorrt.py: not TensorRT itself)."""
    return _fake_module().install(monkeypatch)


def _small_profiles(
    config: Any, prefill: tuple[int, int, int] = (4, 16, 32), decode: tuple[int, int] = (8, 64)
) -> list[dict[str, tuple[tuple[int, ...], ...]]]:
    """Profiles for the tiny shapes in the layout profiles.py returns: 0 prefill (by default up to 4 x 16 new
    tokens after up to 32: `prefill` = (B, S, P)), 1 decode (up to 8 sequences, one token, after up to 64:
    `decode` = (B, P))."""
    from ernie_serve.backends.onnx.graph import past_names

    kv = (config.num_key_value_heads, config.head_dim)
    result = []
    (pb, ps, pp), (db, dp) = prefill, decode
    for (b0, b1), (s0, s1), (p0, p1) in (((1, pb), (2, ps), (1, pp)), ((1, db), (1, 1), (1, dp))):
        opt_b, opt_s, opt_p = b1, s1, p1 // 2
        shapes: dict[str, tuple[tuple[int, ...], ...]] = {
            "input_ids": ((b0, s0), (opt_b, opt_s), (b1, s1)),
            "position_ids": ((b0, s0), (opt_b, opt_s), (b1, s1)),
            "attention_bias": ((b0, s0, p0 + s0), (opt_b, opt_s, opt_p + opt_s), (b1, s1, p1 + s1)),
            "logits_index": ((b0,), (opt_b,), (b1,)),
        }
        for layer in range(config.num_hidden_layers):
            for name in past_names(layer):
                shapes[name] = ((b0, kv[0], p0, kv[1]), (opt_b, kv[0], opt_p, kv[1]), (b1, kv[0], p1, kv[1]))
        result.append(shapes)
    return result


@pytest.fixture()
def small_profiles() -> Any:
    """`small_profiles(config)`: see `_small_profiles`."""
    return _small_profiles


@pytest.fixture(scope="module")
def tiny_graph(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """(config, model.onnx) of today's float32 graph of a tiny MoE with dummy weights: the stand-in parser reads
    only its inputs and outputs, which the TensorRT flavour shares."""
    import torch

    from ernie_serve.backends.onnx.export import export_to_dir
    from ernie_serve.models import read_model_config

    config = read_model_config(tiny_checkpoint("moe_shared_tied", torch.bfloat16))
    out = tmp_path_factory.mktemp("trt-graph")
    export_to_dir(config, None, out, check=False)
    return config, out / "model.onnx"
