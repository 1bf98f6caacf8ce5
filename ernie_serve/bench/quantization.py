"""`ernie-serve bench quantization`: what `--quantization` costs in accuracy and saves in memory (torch backend),
and `--kernels`: the low-bit matmul kernels available here, timed side by side (docs/quantization.md).

Accuracy is teacher-forced: fixed random token sequences (seeded; with `--trained`, windows of held-out text
through the model trained here, `ernie_serve.testing.trained`) run through the float32 model and each
quantized one, the same weights before quantization; at every position, whether the quantized model's top-1
token is the float one's, and the KL divergence `KL(p_float || p_quant)` of the next-token distributions, averaged
over positions. Each sequence is one prefill step, so the several-row kernels compute it: the weight-only
variants (`cpu_weight_prepack` off) compute exactly what decode's row sums compute, up to summation order; the
`+W8A8` rows are the fbgemm int8 GEMM, which also quantizes activations.

Memory: bytes of the quantized tensors (codes, scales and the kernels' per-row bytes) over their float32 size,
and of the whole model's weights over the whole float32 model; a preset model is measured on the meta device
(shapes only, nothing allocated).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ernie_serve.backends.torch.loader import init_dummy_weights, load_safetensors
from ernie_serve.backends.torch.model import AttentionMetadata, ErnieForCausalLM, PrefillGroup, onednn_pack
from ernie_serve.backends.torch.ort_kernels import NBitsKernel, onnxruntime_available
from ernie_serve.backends.torch.quant import QuantizedWeight, stacked_row_sums
from ernie_serve.bench.workload import bench_checkpoint
from ernie_serve.core.config import ModelConfig
from ernie_serve.logging import progress
from ernie_serve.models import model_config_from_dict, num_parameters
from ernie_serve.quantization import QuantSpec, quantize

CPU = torch.device("cpu")


@dataclass(frozen=True)
class Variant:
    """One quantized configuration to compare with float32."""

    spec: QuantSpec
    lm_head: bool = True  # the LM head quantized too
    w8a8: bool = False  # several-row products by fbgemm's int8 GEMM (activations quantized per call)
    exact: bool = False  # on CPU, the float32 row sums instead of torch's int kernels (bfloat16 activations)
    # the int kernels on CPU (`--cpu-quantized-kernels`): "torch" (bfloat16 activations), "onnxruntime" (every
    # matrix through MatMulNBits, int8 activations per block) or "auto" (onnxruntime's for large 4-bit matrices)
    cpu_kernels: str = "torch"

    @property
    def label(self) -> str:
        head = "" if self.lm_head else ", fp32 head"
        w8a8 = " +W8A8" if self.w8a8 else ""
        kernels = "" if self.cpu_kernels == "torch" else f", {self.cpu_kernels} kernels"
        if self.exact:
            kernels = ", exact kernels"
        return f"{self.spec.describe()}{head}{w8a8}{kernels}"


DEFAULT_VARIANTS = (
    Variant(QuantSpec("wint8")),
    Variant(QuantSpec("wint8"), exact=True),
    Variant(QuantSpec("wint8"), w8a8=True),
    Variant(QuantSpec("wint8"), lm_head=False),
    Variant(QuantSpec("wint8"), cpu_kernels="onnxruntime"),  # what `auto` picks for the benchmark model
    Variant(QuantSpec("wint4", 128)),
    Variant(QuantSpec("wint4", 128), exact=True),
    Variant(QuantSpec("wint4", 128), cpu_kernels="auto"),
    Variant(QuantSpec("wint4", 128), cpu_kernels="onnxruntime"),
    Variant(QuantSpec("wint4", 64)),
    Variant(QuantSpec("wint4", 0)),
    Variant(QuantSpec("wint4", 128), lm_head=False),
)


@dataclass
class AccuracyRow:
    model: str
    variant: str
    positions: int
    top1: float  # fraction of positions whose top-1 token equals float32's
    kl: float  # mean KL(p_float || p_quant), nats per position


@dataclass
class MemoryRow:
    model: str
    variant: str
    tensors_ratio: float  # quantized tensors' bytes / their float32 bytes
    model_ratio: float  # all weight bytes / the float32 model's
    weight_gib: float  # all weight bytes, GiB


def build_model(
    config: ModelConfig,
    checkpoint: Path | None,
    variant: Variant | None,
    seed: int = 0,
    device: torch.device = CPU,
    dtype: torch.dtype = torch.float32,
) -> ErnieForCausalLM:
    """Our model of `config`, unquantized or quantized, loaded as the torch backend loads it (on CUDA with
    quantized weights repacked for torch's CUDA kernels, as the backend does)."""
    quant: dict[str, Any] = {}
    if variant is not None:
        quant = {
            "quantization": variant.spec,
            "quantize_lm_head": variant.lm_head,
            "int8_activations": variant.w8a8,
            "exact_quantized_kernels": variant.exact,
            "cpu_quantized_kernels": variant.cpu_kernels,
        }
    model = ErnieForCausalLM(config, dtype, device, **quant).eval()
    if device.type == "meta":
        return model
    if checkpoint is None:
        init_dummy_weights(model, seed)
    else:
        load_safetensors(model, checkpoint)
    if variant is not None:
        model.quantize_tied_lm_head()
        if not variant.exact or variant.w8a8 or device.type == "cuda":
            model.prepare_for_inference()  # the kernels' copies, as the backend makes them
    return model


@torch.inference_mode()
def teacher_forced_logits(model: ErnieForCausalLM, tokens: torch.Tensor) -> torch.Tensor:
    """float32 logits `[T, V]` (on the host) at every position of one sequence `[T]`, as one prefill step on the
    model's device, in its dtype."""
    config = model.config
    n = tokens.shape[0]
    device, dtype = model.embed_weight.device, model.embed_weight.dtype
    slots = (n, 2, config.num_key_value_heads, config.head_dim)  # [N, 2, K, D]: one slot per token
    cache = [torch.empty(slots, dtype=dtype, device=device) for _ in model.layers]
    positions = torch.arange(n, device=device)
    meta = AttentionMetadata(slot_mapping=positions, block_size=n, prefills=[PrefillGroup(0, n)])
    return model(tokens.to(device), positions, cache, meta, positions).float().cpu()


def sequences(num: int, length: int, vocab: int, seed: int = 0) -> list[torch.Tensor]:
    """The fixed token sequences accuracy is measured on (ids 10.. below `vocab`, seeded)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab, (length,), generator=generator) for _ in range(num)]


def compare(reference: list[torch.Tensor], logits: list[torch.Tensor]) -> tuple[int, float, float]:
    """(positions, top-1 agreement, mean KL(p_ref || p)) over all sequences' positions."""
    ref = torch.cat(reference)  # [P, V]
    ours = torch.cat(logits)
    top1 = float((ref.argmax(-1) == ours.argmax(-1)).float().mean())
    kl = F.kl_div(F.log_softmax(ours, -1), F.log_softmax(ref, -1), log_target=True, reduction="batchmean")
    return ref.shape[0], top1, float(kl)


def quantized_tensor_bytes(model: ErnieForCausalLM) -> tuple[int, int]:
    """(bytes of every quantized weight, float32 bytes of the same weights)."""
    weights = [m for m in model.modules() if isinstance(m, QuantizedWeight)]
    quantized = sum(w.nbytes() for w in weights)
    full = sum(len(w.matrices) * w.in_features * w.out_features * 4 for w in weights)
    return quantized, full


def memory_row(name: str, config: ModelConfig, variant: Variant) -> MemoryRow:
    """Byte ratios of `variant` on `config`, from a model on the meta device (nothing is allocated)."""
    model = build_model(config, None, variant, device=torch.device("meta"))
    quantized, full = quantized_tensor_bytes(model)
    total = sum(model.weight_bytes().values())
    return MemoryRow(name, variant.label, quantized / full, total / (num_parameters(config) * 4), total / 2**30)


def accuracy_rows(
    name: str,
    config: ModelConfig,
    checkpoint: Path | None,
    variants: Sequence[Variant],
    num_sequences: int,
    length: int,
    device: torch.device = CPU,
    dtype: torch.dtype = torch.float32,
    prompts: list[torch.Tensor] | None = None,
) -> list[AccuracyRow]:
    """Teacher-forced top-1 agreement and KL of each variant against the unquantized model of the same weights
    (float32 on the CPU; bfloat16 on a GPU, as `gpu_check --quantization` runs it), over `prompts` (token
    sequences) or else `num_sequences` random sequences of `length` tokens."""
    seqs = prompts if prompts is not None else sequences(num_sequences, length, config.vocab_size)
    base = build_model(config, checkpoint, None, device=device, dtype=dtype)
    label = str(dtype).removeprefix("torch.")
    reference = [teacher_forced_logits(base, s) for s in progress(seqs, f"{name}: {label}", unit="seq")]
    del base
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rows = []
    for variant in variants:
        model = build_model(config, checkpoint, variant, device=device, dtype=dtype)
        logits = [teacher_forced_logits(model, s) for s in progress(seqs, f"{name}: {variant.label}", unit="seq")]
        positions, top1, kl = compare(reference, logits)
        rows.append(AccuracyRow(name, variant.label, positions, top1, kl))
        del model  # before the next variant's is built
        print(_format_accuracy(rows[-1]), flush=True)  # as they come: a full run takes a while
    return rows


ACCURACY_HEADER = f"{'model':<32} {'variant':<44} {'positions':>9} {'top-1':>8} {'mean KL':>9}"


def _format_accuracy(row: AccuracyRow) -> str:
    return f"{row.model:<32} {row.variant:<44} {row.positions:>9} {row.top1 * 100:>7.2f}% {row.kl:>9.5f}"


def weight_statistics(config: ModelConfig, checkpoint: Path | None) -> str:
    """One line describing the projection weights' distribution (what random weights make hard)."""
    model = build_model(config, checkpoint, None)
    weight = model.layers[-1].attn.qkv_weight.detach().flatten()
    excess_kurtosis = float(((weight - weight.mean()) ** 4).mean() / weight.var() ** 2 - 3)
    return (
        f"weights: mean {float(weight.mean()):.4f}, std {float(weight.std()):.4f}, "
        f"max |w| / std {float(weight.abs().max() / weight.std()):.1f}, excess kurtosis {excess_kurtosis:.2f} "
        "(last layer's q|k|v projection)"
    )


# ----- kernels -----


def interleaved_medians(
    candidates: dict[str, Callable[[], Any]], repeats: int = 15, calls: int = 5
) -> dict[str, float]:
    """Median microseconds of process CPU time of single calls of each candidate, taken in turns (`calls` each
    per turn, `repeats` turns). CPU time, not wall time: on a machine shared with other work (ours), wall time
    mostly measures how long the process waited for a core; with one torch thread (`main` sets it) CPU time is
    the kernel's own cost. Memory bandwidth is still shared, so memory-bound kernels look slower when others
    are busy."""
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():
        fn()  # warm-up: first calls allocate
    for _ in range(repeats):
        for name, fn in candidates.items():
            for _ in range(calls):
                started = time.process_time()
                fn()
                samples[name].append((time.process_time() - started) * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


def kernel_candidates(in_features: int, out_features: int, rows: int) -> dict[str, Callable[[], Any]]:
    """Every way to multiply `rows` rows by an `[in, out]` weight that this machine's torch offers, for the
    float32 weight and its int8 / int4 (group 128) versions."""
    from ernie_serve.backends.torch.model import project, split_bags

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05  # [out, in]
    x = torch.randn(rows, in_features, generator=generator)
    w_in_out = weight.t().contiguous()  # [in, out]
    packed = onednn_pack(weight)
    q8 = QuantizedWeight(1, in_features, out_features, QuantSpec("wint8"), CPU)
    q8.target().copy_(weight)
    q4 = QuantizedWeight(1, in_features, out_features, QuantSpec("wint4", 128), CPU)
    q4.target().copy_(weight)
    m8, m4 = q8.matrix, q4.matrix
    fb8 = QuantizedWeight(1, in_features, out_features, QuantSpec("wint8"), CPU)
    fb8.target().copy_(weight)
    fb8.pack_for_gemm()
    codes8, scales8 = quantize(weight, QuantSpec("wint8"))
    xb = x.bfloat16()
    codes4, scales4 = quantize(weight, QuantSpec("wint4", 128))
    int4pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu((codes4 + 8).to(torch.int32), 1)
    # [G, out, 2] scale and zero: w = (u - 8) * s = u * s + (-8 s)
    scale_zero = torch.stack((scales4.t(), -8 * scales4.t()), -1).bfloat16().contiguous()
    candidates: dict[str, Callable[[], Any]] = {
        "fp32 mm (MKL)": lambda: torch.mm(x, w_in_out),
    }
    if packed is not None:
        candidates["fp32 oneDNN packed"] = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    if rows == 1:
        candidates["fp32 row sums"] = lambda: project(x, w_in_out)
        candidates["wint8 row sums (fbgemm byte bags)"] = lambda: m8.row_sums(x, split_bags(in_features))
        candidates["wint4 g128 row sums (fbgemm 4-bit bags)"] = lambda: m4.row_sums(x, split_bags(in_features))
    else:
        which = torch.zeros(rows, dtype=torch.long)
        candidates["wint8 row sums, a bag per row"] = lambda: stacked_row_sums(q8, x, which)
        candidates["wint4 g128 row sums, a bag per row"] = lambda: stacked_row_sums(q4, x, which)
    candidates["wint8 dequantize + mm"] = lambda: m8.matmul(x)
    candidates["wint4 g128 dequantize + mm"] = lambda: m4.matmul(x)
    candidates["wint8 fbgemm linear_dynamic (W8A8)"] = lambda: fb8.matrix.matmul(x)
    candidates["wint8 _weight_int8pack_mm (bf16 x)"] = lambda: torch.ops.aten._weight_int8pack_mm(
        xb, codes8, scales8[:, 0].bfloat16()
    )
    candidates["wint4 _weight_int4pack_mm_for_cpu (bf16 x)"] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
        xb, int4pack, 128, scale_zero
    )
    if onnxruntime_available():  # a session of torch's thread count (one, in `main`)
        nbits = NBitsKernel.pack(lambda c: codes4[c], scales4.t().contiguous(), QuantSpec("wint4", 128), in_features)
        candidates["wint4 g128 onnxruntime MatMulNBits (int8 x per block)"] = lambda: nbits.matmul(x)
    return candidates


# [in, out]: the benchmark model's q|k|v, o / expert gate|up, expert down, LM head; a 21B-A3B expert's gate|up;
# the 4096 x 4096
KERNEL_SHAPES = ((512, 768), (512, 512), (256, 512), (512, 32000), (2560, 3072), (4096, 4096))
KERNEL_ROWS = (1, 4, 16, 64)


def kernel_table(
    shapes: Sequence[tuple[int, int]], rows: Sequence[int], repeats: int
) -> list[tuple[str, dict[str, float]]]:
    results = []
    for in_features, out_features in shapes:
        for n in rows:
            times = interleaved_medians(kernel_candidates(in_features, out_features, n), repeats)
            results.append((f"[{in_features}, {out_features}] x {n} rows", times))
            print(_format_kernels(results[-1]), flush=True)
    return results


def _format_kernels(result: tuple[str, dict[str, float]]) -> str:
    title, times = result
    fastest = min(times.values())
    lines = [title]
    for name, us in sorted(times.items(), key=lambda kv: kv[1]):
        lines.append(f"  {name:<44} {us:>10.1f} us  {us / fastest:>5.2f}x")
    return "\n".join(lines)


# ----- the command -----


def tiny_models() -> list[tuple[str, ModelConfig]]:
    from ernie_serve.testing.checkpoints import _BASE, TINY_SHAPES

    configs = []
    for shape, fields in TINY_SHAPES.items():
        raw = {**_BASE, **fields}
        raw.setdefault("head_dim", raw["hidden_size"] // raw["num_attention_heads"])
        configs.append((f"tiny {shape}", model_config_from_dict(raw)))
    return configs


def main(
    variants: Sequence[Variant] = DEFAULT_VARIANTS,
    num_sequences: int = 16,
    length: int = 128,
    include_tiny: bool = True,
    kernels: bool = False,
    kernel_repeats: int = 11,
    threads: int | None = None,
    trained: bool = False,
) -> int:
    """Print the accuracy and memory tables (with `kernels` the kernel timings instead; with `trained` the
    accuracy of the trained model instead); returns 0."""
    if threads is not None:
        torch.set_num_threads(threads)
    if kernels:
        torch.set_num_threads(1)  # CPU time per call is then the kernel's cost (see `interleaved_medians`)
        kernel_table(KERNEL_SHAPES, KERNEL_ROWS, kernel_repeats)
        return 0
    if not onnxruntime_available():
        print("onnxruntime is not installed: its kernels' rows are left out (pip install 'ernie-serve[onnx]')")
        variants = [v for v in variants if v.cpu_kernels == "torch"]
    if trained:
        return trained_accuracy(variants, num_sequences, length)
    from ernie_serve.bench.workload import BENCH_MODEL
    from ernie_serve.models import PRESETS

    checkpoint = bench_checkpoint()
    # the benchmark checkpoint's weights are N(0, 0.05): at this width a random network of that gain is
    # chaotic (a small change to a layer's output grows through the layers), so the same shape with the
    # dummy weights N(0, 0.02) is measured too
    models: list[tuple[str, ModelConfig, Path | None]] = [
        ("bench 70M (N(0, 0.05))", BENCH_MODEL, checkpoint),
        ("bench 70M shape, dummy N(0, 0.02)", BENCH_MODEL, None),
    ]
    if include_tiny:
        # the tiny shapes with dummy weights N(0, 0.02) (the checkpoints' own weights need transformers)
        models += [(name, config, None) for name, config in tiny_models()]
    print(weight_statistics(BENCH_MODEL, checkpoint))
    print(f"teacher-forced: {num_sequences} random sequences of {length} tokens per model, one prefill each\n")
    print(ACCURACY_HEADER)
    for name, config, path in models:
        accuracy_rows(name, config, path, variants, num_sequences, length)
    print()
    presets = [(name, PRESETS[name]) for name in ("ernie-4.5-0.3b", "ernie-4.5-21b-a3b") if name in PRESETS]
    memory_models = [("bench 70M", BENCH_MODEL), *presets]
    print(f"{'model':<32} {'variant':<40} {'tensors/fp32':>12} {'model/fp32':>10} {'weights GiB':>11}")
    for name, config in memory_models:
        kernels_only = [v for v in variants if v.w8a8 or v.exact or v.cpu_kernels != "torch"]  # same bytes
        for variant in {v.label: v for v in variants if v not in kernels_only}.values():
            row = memory_row(name, config, variant)
            print(
                f"{row.model:<32} {row.variant:<40} {row.tensors_ratio:>12.4f} {row.model_ratio:>10.4f} "
                f"{row.weight_gib:>11.2f}"
            )
    return 0


def trained_accuracy(variants: Sequence[Variant], num_sequences: int, length: int) -> int:
    """Called by `main` with `trained`: the accuracy table of the model trained here (`ernie_serve.testing.
    trained`, trained on first use) over held-out text; returns 0."""
    from ernie_serve.testing.trained import held_out_sequences, trained_checkpoint, trained_config

    checkpoint = trained_checkpoint()
    config = trained_config()
    summary = json.loads((checkpoint / "training.json").read_text())
    print(
        f"trained model {checkpoint.name}: {summary['steps']} steps, {summary['tokens_seen']:,} tokens seen of "
        f"{summary['training_tokens']:,}; training loss {summary['final_training_loss']:.3f}, held-out loss "
        f"{summary['held_out_loss']:.3f} nats/token"
    )
    print(weight_statistics(config, checkpoint))
    prompts = held_out_sequences(num_sequences, length)
    # what kind of language model it is: how often float32's top-1 is the held-out text's next token, and
    # how sure it is (a random model's top-1 probability is about 1/vocab)
    model = build_model(config, checkpoint, None)
    probs = torch.cat([teacher_forced_logits(model, p)[:-1].softmax(-1) for p in prompts])  # [P, V]
    targets = torch.cat([p[1:] for p in prompts])  # [P]
    del model
    hits = float((probs.argmax(-1) == targets).float().mean())
    print(
        f"float32 on the held-out windows: top-1 is the next token at {hits * 100:.1f}% of positions; "
        f"mean top-1 probability {float(probs.max(-1).values.mean()):.3f}"
    )
    print(f"teacher-forced: {num_sequences} held-out windows of {length} tokens, one prefill each\n")
    print(ACCURACY_HEADER)
    accuracy_rows("trained MoE (demo shape)", config, checkpoint, variants, num_sequences, length, prompts=prompts)
    return 0
