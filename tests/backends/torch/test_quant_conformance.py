"""The conformance suite on the torch backend with `--quantization`: chunked prefill, prefix caching,
preemption, aborts and seeded sampling, against transformers on the dequantized weights."""

from __future__ import annotations

import pytest
import torch

from ernie_serve.testing.conformance import BackendConformance, conformance_cases

EXACT = {"exact_quantized_kernels": True}
# (LLM keywords, whether the kernels round beyond float32): the exact kernels compute exactly with the
# dequantized weights; torch's int8/int4 kernels (the default) round activations to bfloat16, so the suite's
# reduced-precision tolerances apply to them. Not here: `int8_activations` (W8A8), whose per-call activation
# scale makes a request's tokens depend on its batch (it fails `mixed_batching` by design); test_quant.py
# covers its kernel.
VARIANTS = {
    "wint4-g128": ({"quantization": "wint4", **EXACT}, False),
    "wint4-g64-fp32-head": (
        {"quantization": "wint4", "quantization_group_size": 64, "quantize_lm_head": False, **EXACT},
        False,
    ),
    "wint8": ({"quantization": "wint8", **EXACT}, False),
    "wint8-no-prepack": ({"quantization": "wint8", "cpu_weight_prepack": False}, False),
    "wint8-int-kernels": ({"quantization": "wint8"}, True),
    "wint4-g64-int-kernels": ({"quantization": "wint4", "quantization_group_size": 64}, True),
}
# Not here either: `cpu_quantized_kernels="onnxruntime"`, which rounds activations to int8 per block: on the
# top-1-routed tiny model that flips an expert and moves a greedy token 2.9 nats below the reference's, past the
# suite's near-tie allowance (as the onnx backend's default exports do). test_ort_kernels.py covers its kernel
# and a model on it; `auto`, the default, leaves these tiny shapes on torch's kernels.


@pytest.fixture(scope="module")
def suites(tiny_checkpoint, tmp_path_factory):
    made: dict[str, BackendConformance] = {}

    def get(variant: str) -> BackendConformance:
        if variant not in made:
            settings, approximate = VARIANTS[variant]
            made[variant] = BackendConformance(
                "torch",
                tmp_path_factory.mktemp(f"conformance-{variant}"),
                checkpoints=lambda shape: tiny_checkpoint(shape, torch.bfloat16),
                approximate=approximate,
                **settings,
            )
        return made[variant]

    yield get
    for suite in made.values():
        suite.close()


@pytest.mark.parametrize("case", conformance_cases())
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_quantized_conformance(suites, variant: str, case: str) -> None:
    suites(variant).run_case(case)


def test_the_dequantized_reference_is_what_makes_it_pass(tiny_checkpoint, tmp_path) -> None:
    """Against the original (unquantized) weights, a wint4 model's greedy tokens do not all match: the
    suite's reference must be the dequantized one, or the quantized cases above would test nothing."""
    suite = BackendConformance(
        "torch", tmp_path, checkpoints=lambda shape: tiny_checkpoint(shape, torch.bfloat16), quantization="wint4"
    )
    try:
        suite.reference_checkpoint = suite.checkpoint  # type: ignore[method-assign]
        with pytest.raises(AssertionError):
            for shape in ("moe_shared_tied", "moe_interval2_untied_mqa", "dense_bias_headdim"):
                suite.check_greedy_parity(shape)
    finally:
        suite.close()
