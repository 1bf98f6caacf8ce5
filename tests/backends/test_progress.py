"""Long steps a user waits for report progress: weight loading, dummy weights, repacking, ONNX export. Each bar's
total (when given) is what the step really iterates, so a bar ends at 100%."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import pytest
import torch

from ernie_serve.backends.torch import loader, model
from ernie_serve.backends.torch.model import ErnieForCausalLM
from ernie_serve.models import read_model_config


@pytest.fixture()
def bars(monkeypatch) -> list[dict[str, Any]]:
    """Replaces `progress` where the backends use it; records each bar and how many items went through it."""
    recorded: list[dict[str, Any]] = []

    def progress(items: Iterable[Any], description: str, total: int | None = None, unit: str = "it") -> Iterator[Any]:
        bar = {"description": description, "total": total, "unit": unit, "count": 0}
        recorded.append(bar)
        for item in items:
            bar["count"] += 1
            yield item

    monkeypatch.setattr(loader, "progress", progress)
    monkeypatch.setattr(model, "progress", progress)
    try:
        from ernie_serve.backends.onnx import graph

        monkeypatch.setattr(graph, "progress", progress)
    except ImportError:  # numpy missing: no onnx backend to check
        pass
    return recorded


def _model(checkpoint) -> ErnieForCausalLM:
    return ErnieForCausalLM(read_model_config(checkpoint), torch.float32, torch.device("cpu"))


def test_loading_a_checkpoint_counts_every_tensor(tiny_checkpoint, bars) -> None:
    checkpoint = tiny_checkpoint("moe_interval2_untied_mqa", torch.bfloat16)  # sharded, untied head
    target = _model(checkpoint)
    loader.load_safetensors(target, checkpoint)
    (bar,) = bars
    assert bar["description"] == "loading weights" and bar["unit"] == "tensor"
    assert bar["total"] == bar["count"] == len(list(target.checkpoint_targets()))


def test_dummy_weights_and_repacking_report_progress(tiny_checkpoint, bars) -> None:
    target = _model(tiny_checkpoint("moe_shared_tied", torch.bfloat16))
    loader.init_dummy_weights(target, seed=0)
    target.prepare_for_inference()
    dummy, repack = bars
    assert dummy["description"] == "initializing dummy weights"
    assert dummy["count"] == len(list(target.checkpoint_targets()))
    assert repack["description"] == "repacking weights"
    packable = [m for m in target.modules() if isinstance(m, model.Attention | model.MLP | model.SparseMoE)]
    assert repack["count"] == len(packable) == 8  # 3 attentions, 1 dense MLP, 2 MoEs and their shared MLPs


def test_onnx_export_reports_one_step_per_layer(tiny_checkpoint, bars, tmp_path) -> None:
    pytest.importorskip("onnx")
    from ernie_serve.backends.onnx.export import export_to_dir

    checkpoint = tiny_checkpoint("moe_shared_tied", torch.bfloat16)
    config = read_model_config(checkpoint)
    export_to_dir(config, str(checkpoint), tmp_path / "out", check=False)
    (exporting,) = bars  # the weights are read inside the layers' step, one tensor at a time
    assert exporting["description"] == "exporting to ONNX" and exporting["unit"] == "layer"
    assert exporting["count"] == config.num_hidden_layers
