"""`ernie-serve bench quantization`'s measurements: teacher-forced agreement and the memory ratios (the issue's
memory targets are checked here on the real presets' shapes, on the meta device)."""

from __future__ import annotations

import pytest
import torch

from ernie_serve.bench.quantization import (
    Variant,
    accuracy_rows,
    compare,
    interleaved_medians,
    memory_row,
    tiny_models,
)
from ernie_serve.bench.workload import BENCH_MODEL
from ernie_serve.models import PRESETS
from ernie_serve.quantization import QuantSpec


def test_compare_counts_agreement_and_kl() -> None:
    reference = [torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])]
    same = compare(reference, reference)
    assert same == (2, 1.0, pytest.approx(0.0, abs=1e-7))
    flipped = compare(reference, [torch.tensor([[0.0, 2.0, 0.0], [0.0, 3.0, 0.0]])])
    assert flipped[:2] == (2, 0.5) and flipped[2] > 0


def test_accuracy_rows_on_a_tiny_shape() -> None:
    name, config = tiny_models()[0]
    rows = accuracy_rows(name, config, None, [Variant(QuantSpec("wint8")), Variant(QuantSpec("wint4", 0))], 2, 24)
    assert [r.positions for r in rows] == [48, 48]
    wint8, wint4 = rows
    assert wint8.top1 >= 0.9 and 0 <= wint8.kl < wint4.kl  # int4 per channel rounds ~16x coarser


@pytest.mark.parametrize(("scheme", "bound"), [("wint8", 0.26), ("wint4", 0.14)])
def test_memory_targets_on_the_presets(scheme: str, bound: float) -> None:
    variant = Variant(QuantSpec.of(scheme, 128))
    for config in (BENCH_MODEL, PRESETS["ernie-4.5-21b-a3b"]):
        assert memory_row("m", config, variant).tensors_ratio <= bound
    big = memory_row("21b", PRESETS["ernie-4.5-21b-a3b"], variant)
    assert abs(big.model_ratio - big.tensors_ratio) <= 0.02  # the target for the 21B-A3B


def test_kernel_timings_cover_every_candidate() -> None:
    calls = {"a": 0, "b": 0}

    def count(name: str):
        return lambda: calls.__setitem__(name, calls[name] + 1)

    medians = interleaved_medians({"a": count("a"), "b": count("b")}, repeats=3, calls=2)
    assert set(medians) == {"a", "b"} and all(v >= 0 for v in medians.values())
    assert calls == {"a": 7, "b": 7}  # one warm-up, then 3 turns of 2


def test_the_w8a8_variant_uses_the_int8_gemm() -> None:
    name, config = tiny_models()[0]
    weight_only, w8a8 = accuracy_rows(
        name, config, None, [Variant(QuantSpec("wint8")), Variant(QuantSpec("wint8"), w8a8=True)], 1, 16
    )
    assert w8a8.kl != weight_only.kl  # activations quantized: not the weight-only result


def test_the_onnxruntime_variant_runs_onnxruntimes_kernel() -> None:
    pytest.importorskip("onnxruntime", reason="the test extra installs onnxruntime")
    name, config = tiny_models()[0]
    spec = QuantSpec("wint4", 64)
    torch_kernels, onnxruntime = accuracy_rows(
        name, config, None, [Variant(spec), Variant(spec, cpu_kernels="onnxruntime")], 1, 16
    )
    assert onnxruntime.variant.endswith("onnxruntime kernels")
    assert onnxruntime.kl != torch_kernels.kl and onnxruntime.kl < 0.01  # int8 activations: close, not equal
