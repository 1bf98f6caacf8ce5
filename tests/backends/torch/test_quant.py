"""The torch backend's quantized weights (`--quantization`): storage, each kernel path against a float32
matmul by the dequantized weight, streaming load, and greedy decoding against a dequantized-weights reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ernie_serve import LLM, SamplingParams
from ernie_serve.backends.torch import quant
from ernie_serve.backends.torch.backend import TorchBackend
from ernie_serve.backends.torch.loader import init_dummy_weights
from ernie_serve.backends.torch.model import ErnieForCausalLM, SparseMoE
from ernie_serve.backends.torch.quant import Int4Kernel, Int8Kernel, QuantizedWeight, stacked_row_sums
from ernie_serve.core import plugins
from ernie_serve.core.backend import BackendCapabilities
from ernie_serve.core.config import ModelConfig
from ernie_serve.core.engine_core import UnsupportedQuantizationError
from ernie_serve.core.errors import UserError
from ernie_serve.quantization import QuantSpec, dequantize, quantize, write_dequantized_checkpoint
from ernie_serve.testing.checkpoints import load_reference, reference_greedy

CPU = torch.device("cpu")
SPECS = [QuantSpec("wint8"), QuantSpec("wint4"), QuantSpec("wint4", 64), QuantSpec("wint4", 128)]
IDS = [s.describe() for s in SPECS]


CUDA = pytest.param(
    torch.device("cuda"),
    marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the GPU check runs it there)"),
    id="cuda",
)


def _filled(
    spec: QuantSpec, count: int, in_features: int, out_features: int, seed: int = 0, device: torch.device = CPU
):
    """A QuantizedWeight filled from random `[out, in]` matrices, and those matrices' dequantized values (on the
    CPU, float32)."""
    generator = torch.Generator().manual_seed(seed)
    weight = QuantizedWeight(count, in_features, out_features, spec, device)
    expected = []
    for index in range(count):
        matrix = torch.randn(out_features, in_features, generator=generator) * 0.05
        # filled in two column slices, as q|k|v or gate|up are
        half = out_features // 2
        weight.target(index, slice(0, half)).copy_(matrix[:half].to(device))
        weight.target(index, slice(half, out_features)).copy_(matrix[half:].to(device))
        expected.append(dequantize(*quantize(matrix, spec), spec))  # [out, in]
    return weight, expected


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("in_features", [256, 200])
def test_storage_holds_exactly_the_shared_math(spec: QuantSpec, in_features: int) -> None:
    weight, expected = _filled(spec, 2, in_features, 96)
    for index in range(2):
        assert torch.equal(weight.dequantized(index), expected[index])
    assert weight.rows.dtype == torch.uint8
    # 1 or 0.5 bytes of code per weight, the kernel's 8 or 4 bytes per row, float32 scales per group
    row_bytes = 96 + 8 if spec.bits == 8 else 48 + 4
    assert weight.nbytes() == 2 * (in_features * row_bytes + spec.num_groups(in_features) * 96 * 4)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("in_features", [256, 200])
def test_row_sums_and_dequantized_matmul_equal_the_float_product(spec: QuantSpec, in_features: int) -> None:
    weight, expected = _filled(spec, 1, in_features, 96)
    matrix = weight.matrix
    generator = torch.Generator().manual_seed(1)
    one = torch.randn(1, in_features, generator=generator)
    several = torch.randn(5, in_features, generator=generator)
    reference = expected[0].t()  # [in, out]
    for splits in (torch.tensor([0]), torch.tensor([0, 100])):  # one bag, or split over two threads
        torch.testing.assert_close(matrix.row_sums(one, splits), one @ reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(matrix.matmul(several), several @ reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_stacked_row_sums_pick_each_bags_matrix(spec: QuantSpec) -> None:
    weight, expected = _filled(spec, 3, 192, 64)
    x = torch.randn(4, 192, generator=torch.Generator().manual_seed(2))
    which = torch.tensor([2, 0, 2, 1])
    reference = torch.stack([x[b] @ expected[int(which[b])].t() for b in range(4)])
    torch.testing.assert_close(stacked_row_sums(weight, x, which), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_device_kernel_copies_multiply_like_the_codes_and_replace_them(spec: QuantSpec, device: torch.device) -> None:
    """`pack_for_device`, which the model runs on CUDA: on the GPU, torch's CUDA kernels; on the CPU, torch's CPU
    kernels of the same ops: the very int8 op, and the CPU twin of tinygemm's int4 op (which takes the codes
    before nibble packing)."""
    weight, expected = _filled(spec, 2, 256, 96, device=device)
    codes = weight.matrices[1].codes()  # [in, out]
    assert torch.equal(weight.matrices[1].codes(slice(32, 64)), codes[:, 32:64])
    weight.pack_for_device()
    assert weight.rows.numel() == 0 and all(m.device_kernel is not None for m in weight.matrices)
    assert weight.scales.numel() == 0 and all(m.scales.numel() == 0 for m in weight.matrices)  # the kernels' own
    for matrix in weight.matrices:  # the copies hold the codes at 8 or 4 bits, as the row-wise layout did
        kernel = matrix.device_kernel
        codes = kernel.codes if isinstance(kernel, Int8Kernel) else kernel.packed
        assert codes.numel() * codes.element_size() == 256 * 96 * spec.bits // 8
    with pytest.raises(RuntimeError, match="released"):
        weight.dequantized(0)
    generator = torch.Generator().manual_seed(3)
    for rows in (1, 12):  # wint8: the int8 kernel up to 8 rows, a float copy of the codes above
        x = torch.randn(rows, 256, generator=generator)
        for index in range(2):
            reference = x @ expected[index].t()  # [rows, 96]
            out = weight.matrices[index].matmul(x.to(device)).float().cpu()
            # wint4, and wint8 on the CPU, run in bfloat16 (activations, scales and result): about 2^-8 relative
            # error each; wint8 on CUDA takes float32 activations as they are
            exact = spec.bits == 8 and device.type == "cuda"
            bound = 1e-4 if exact else 2e-2 * reference.abs().max().item()
            assert out.shape == reference.shape and (out - reference).abs().max().item() < bound


@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("device", [CUDA])
def test_cuda_kernels_on_a_21b_expert_in_bfloat16(spec: QuantSpec, device: torch.device, rows: int) -> None:
    """What the 21B-A3B's experts run on a GPU: a `[2560 -> 1536]` matrix, bfloat16 activations, the CUDA kernels
    against the dequantized weight's product in float32 (bfloat16 rounding: about 1% of the largest value)."""
    weight, expected = _filled(spec, 1, 2560, 1536, device=device)
    weight.pack_for_device()
    assert weight.matrix.device_kernel is not None
    x = torch.randn(rows, 2560, generator=torch.Generator().manual_seed(5))
    reference = x @ expected[0].t()  # [rows, 1536]
    out = weight.matrix.matmul(x.to(device, torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 1536)
    error = (out.float().cpu() - reference).abs().max().item() / reference.abs().max().item()
    assert error < 2e-2, error


def test_int4_cpu_packing_by_blocks_of_output_channels_equals_packing_at_once(monkeypatch) -> None:
    """The CPU int4 layout packs output channels independently, so the 21B-A3B's LM head can be packed a block
    at a time instead of as one int32 matrix of 1 GiB."""
    codes = torch.randint(-8, 8, (4 * 64 + 64, 256), generator=torch.Generator().manual_seed(6), dtype=torch.int8)
    scales = torch.rand(2, codes.shape[0]) + 0.5  # [G, out]
    whole = Int4Kernel.pack(codes, scales, 128)
    monkeypatch.setattr(quant, "CPU_PACK_ROWS", 64)
    blocks = Int4Kernel.pack(codes, scales, 128)
    assert whole is not None and blocks is not None and torch.equal(whole.packed, blocks.packed)


def test_int4_device_kernel_needs_whole_groups_and_keeps_the_codes_otherwise() -> None:
    weight, expected = _filled(QuantSpec("wint4"), 1, 200, 96)  # 200 rows: no group size of 32-256 tiles it
    weight.pack_for_device()
    assert weight.matrix.device_kernel is None and weight.rows.shape[1] == 200
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(weight.matrix.matmul(x), x @ expected[0].t(), rtol=1e-5, atol=1e-5)


def test_cpu_int8_kernel_applies_its_scales_in_float32() -> None:
    """torch's CPU int8 kernel takes bfloat16 scales; ours get multiplied in float32 after it, so a scale bfloat16
    cannot hold exactly is not rounded (a bias of up to 0.4% on every position of an output channel)."""
    scale = 1 + 3 * 2**-9  # bfloat16 (spacing 2**-7 at 1) would round it to 1 + 2**-7
    kernel = Int8Kernel(torch.ones(2, 256, dtype=torch.int8), torch.tensor([scale, 1.0]))
    out = kernel.matmul(torch.ones(3, 256))  # [3, 2]: sums of 256 ones, exact in bfloat16
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor([[256 * scale, 256.0]] * 3))


def test_int8_gemm_copy_quantizes_activations_within_a_few_percent() -> None:
    """The fbgemm copy (`pack_for_gemm`) is W8A8-dynamic: close to the weight-only product, not equal (7-bit
    activations per tensor: about 2% here, twice the error int8 weights alone add to a product)."""
    weight, expected = _filled(QuantSpec("wint8"), 1, 256, 96)
    assert weight.pack_for_gemm() > 0
    x = torch.randn(7, 256, generator=torch.Generator().manual_seed(3))
    exact = x @ expected[0].t()
    got = weight.matrix.matmul(x)
    relative = float((got - exact).norm() / exact.norm())
    assert 0 < relative < 0.05
    int4, _ = _filled(QuantSpec("wint4", 128), 1, 256, 96)
    assert int4.pack_for_gemm() == 0 and int4.matrix.packed is None  # no int4 GEMM copy


def _moe_config(**overrides) -> ModelConfig:
    fields = dict(
        model_type="ernie4_5_moe",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        moe_intermediate_size=64,
        moe_k=2,
        moe_num_experts=16,
        moe_num_shared_experts=1,
        moe_layer_start_index=1,
    )
    return ModelConfig(**{**fields, **overrides})


@pytest.mark.parametrize("spec", [QuantSpec("wint8"), QuantSpec("wint4", 64)], ids=lambda s: s.describe())
def test_few_token_moe_path_equals_the_grouped_one(spec: QuantSpec) -> None:
    model = ErnieForCausalLM(_moe_config(), torch.float32, CPU, quantization=spec)
    init_dummy_weights(model, seed=0)
    moe = model.layers[1].mlp
    assert isinstance(moe, SparseMoE) and moe.quantized
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    residual = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    experts, weights = moe.route(x)
    few = moe._forward_few_tokens_quantized(x, experts, weights, residual)
    grouped = moe._forward_grouped(x, experts, weights, residual)
    torch.testing.assert_close(few, grouped, rtol=1e-5, atol=1e-5)


def test_quantized_model_allocates_no_float_projection() -> None:
    config = _moe_config(tie_word_embeddings=False)
    model = ErnieForCausalLM(config, torch.float32, CPU, quantization=QuantSpec("wint8"), quantize_lm_head=True)
    float_names = {name for name, _ in model.named_parameters()}
    allowed = ("embed_weight", "norm.weight", "router_weight", "score_bias")
    assert float_names and all(name.endswith(allowed) for name in float_names), float_names
    assert model.lm_head_weight is None and model.lm_head_quantized is not None


class _LargestFloat(TorchDispatchMode):
    """Records the largest floating-point tensor any operation produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.numel() != 0:
                # a view of a parameter is not a temporary
                if tensor._base is None or tensor.untyped_storage().nbytes() <= 8 * tensor.numel():
                    self.largest = max(self.largest, tensor.untyped_storage().nbytes() // 4)
        return out


@pytest.mark.parametrize("scheme", ["wint8", "wint4"])
def test_dummy_weights_are_made_one_tensor_at_a_time(scheme: str) -> None:
    """The largest float temporary while generating quantized dummy weights is a few copies of one expert's
    matrix, not a stack of experts (16 x 64 x 128 floats here) nor the model."""
    config = _moe_config(vocab_size=64)
    model = ErnieForCausalLM(config, torch.float32, CPU, quantization=QuantSpec.of(scheme, 64))
    one_tensor = 64 * 64  # [I, H] or [H, I] of one expert, or one dense projection; the embedding is 64 x 64
    recorder = _LargestFloat()
    with recorder:
        init_dummy_weights(model, seed=0)
    stack = 16 * 64 * 128
    assert recorder.largest <= 2 * 96 * 64  # the dense MLP's gate/up [96, 64] with its padded groups, at most
    assert recorder.largest < stack / 8 and one_tensor <= recorder.largest


def _greedy(llm: LLM, prompts: list[list[int]], tokens: int = 6) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


PROMPTS = [[5, 6, 7], list(range(10, 31)), [300, 301]]


@pytest.mark.parametrize(("scheme", "group"), [("wint8", 128), ("wint4", 128), ("wint4", 64), ("wint4", -1)], ids=str)
@pytest.mark.parametrize("shape", ["moe_shared_tied", "moe_interval2_untied_mqa", "dense_bias_headdim"])
def test_greedy_tokens_equal_the_dequantized_reference(
    tiny_checkpoint, tmp_path: Path, scheme: str, group: int, shape: str
) -> None:
    """The exact kernels compute with exactly the dequantized weights: transformers on a checkpoint of those
    weights (float32) gives the same greedy tokens, through chunked prefill and single-token decode."""
    checkpoint = tiny_checkpoint(shape, torch.bfloat16)
    spec = QuantSpec.of(scheme, group)
    reference = load_reference(write_dequantized_checkpoint(checkpoint, tmp_path / "deq", spec, lm_head=True))
    llm = LLM(
        model=str(checkpoint),
        quantization=scheme,
        quantization_group_size=group,
        block_size=4,
        max_num_batched_tokens=16,
        exact_quantized_kernels=True,
    )
    ours = _greedy(llm, PROMPTS)
    assert ours == [reference_greedy(reference, p, 6) for p in PROMPTS]
    kinds = llm.engine.core.weight_bytes
    assert kinds["quantized"] > 0 and kinds["full_precision"] > 0


def test_engine_refuses_a_scheme_the_backend_does_not_declare(tiny_checkpoint, monkeypatch) -> None:
    class FullPrecisionOnly(TorchBackend):
        name = "fponly"
        capabilities = BackendCapabilities(quantization=("wint8",))

    registration = plugins.Registration("fponly", FullPrecisionOnly, "test", None, None)
    monkeypatch.setitem(plugins.registry().backends, "fponly", registration)
    checkpoint = str(tiny_checkpoint("moe_shared_tied", torch.bfloat16))
    with pytest.raises(UnsupportedQuantizationError) as refused:
        LLM(model=checkpoint, backend="fponly", quantization="wint4")
    assert isinstance(refused.value, UserError)
    assert str(refused.value) == "--quantization wint4: the fponly backend does not implement it (its schemes: wint8)"


def test_int8_activations_run_every_product_through_the_int8_gemm(tiny_checkpoint) -> None:
    """W8A8 is opt-in: with it, decode and prefill take fbgemm's GEMM on int8 copies; results stay close."""
    checkpoint = str(tiny_checkpoint("moe_shared_tied", torch.bfloat16))
    llm = LLM(model=checkpoint, quantization="wint8", int8_activations=True, block_size=4)
    backend = llm.engine.core.backend
    moe = backend.model.layers[1].mlp
    assert moe.expert_weights[0][0].packed is not None and backend.model.lm_head_quantized.matrix.packed is not None
    assert llm.engine.core.weight_bytes["kernel_copies"] > 0
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
    w8a8 = llm.generate({"prompt_token_ids": PROMPTS[1]}, params)[0].outputs[0]
    weight_only = (
        LLM(model=checkpoint, quantization="wint8", block_size=4)
        .generate({"prompt_token_ids": PROMPTS[1]}, params)[0]
        .outputs[0]
    )
    assert len(w8a8.token_ids) == 6 and w8a8.token_ids[0] == weight_only.token_ids[0]
    first = w8a8.logprobs[0][w8a8.token_ids[0]].logprob
    assert first == pytest.approx(weight_only.logprobs[0][weight_only.token_ids[0]].logprob, abs=0.2)


@pytest.mark.parametrize(("scheme", "group"), [("wint8", 128), ("wint4", 64)], ids=str)
def test_cpu_default_multiplies_by_torch_int_kernels_close_to_the_exact_ones(
    tiny_checkpoint, first_tokens_agree, scheme: str, group: int
) -> None:
    """By default a quantized model on the CPU multiplies by torch's weight-only int8/int4 kernels (bfloat16
    activations) wherever their shape rules fit, in place of the row-wise codes; `exact_quantized_kernels`
    keeps the float32 row sums. Both give nearly the same log-probabilities."""
    checkpoint = str(tiny_checkpoint("moe_shared_tied", torch.bfloat16))
    settings = dict(quantization=scheme, quantization_group_size=group, block_size=4, max_num_batched_tokens=16)
    fast, exact = LLM(model=checkpoint, **settings), LLM(model=checkpoint, exact_quantized_kernels=True, **settings)
    gate_up = fast.engine.core.backend.model.layers[1].mlp.expert_weights[0][0]  # [H=64, 2I]: tiles groups of 64
    assert gate_up.device_kernel is not None and gate_up.rows.shape[0] == 0  # the row-wise codes are gone
    exact_gate_up = exact.engine.core.backend.model.layers[1].mlp.expert_weights[0][0]
    assert exact_gate_up.device_kernel is None and exact_gate_up.rows.shape[0] == 64
    first_tokens_agree(fast, exact, 0.05)


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "int-kernels"])
def test_a_step_that_wants_no_logits_runs(tiny_checkpoint, exact: bool) -> None:
    """A prompt longer than the step budget, alone: its first chunk's step asks the LM head for no rows (the
    exact kernels' row sums took row 0 of an empty batch and failed the request)."""
    checkpoint = str(tiny_checkpoint("moe_shared_tied", torch.bfloat16))
    llm = LLM(model=checkpoint, quantization="wint8", exact_quantized_kernels=exact, max_num_batched_tokens=16)
    output = llm.generate({"prompt_token_ids": list(range(10, 31))}, SamplingParams(max_tokens=2))[0].outputs[0]
    assert output.finish_reason == "length" and len(output.token_ids) == 2
