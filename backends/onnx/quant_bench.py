"""`ernie-serve bench quantization --backend onnx`: the onnx backend's quantized exports against its float32
export (teacher-forced top-1 agreement and mean KL, weight bytes), and with `--kernels` onnxruntime's
quantized matmul kernels timed side by side (docs/quantization.md, "onnx backend").

Accuracy: the same fixed random sequences as the torch backend's command (`ernie_serve.bench.quantization`),
each fed one token per graph run with its growing KV cache, so every position is a one-row product, as in
decode. The exported kernels round activations per row (and block), so a row's result is the same in a batch.

Kernels: CPU time of single calls (onnxruntime on one intra-op thread, which is the calling thread), taken in
turns, medians: on a machine shared with other work, wall time measures the scheduler more than the kernel.
Each kernel's error is the largest deviation from the float32 product with its own dequantized weight,
relative to that product's largest magnitude.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ernie_serve.backends.onnx.backend import inference_session
from ernie_serve.backends.onnx.export import ExportOptions, export_to_dir
from ernie_serve.backends.onnx.graph import (
    MS_DOMAIN,
    GraphQuantization,
    matmul_nbits_inputs,
    new_names,
    past_names,
)
from ernie_serve.logging import progress
from ernie_serve.quantization import QuantSpec, dequantize, quantize


def variants() -> tuple[tuple[str, ExportOptions], ...]:
    """(label, export options): the exports compared with the float32 one. The routed experts run as one QMoE
    node per layer where onnxruntime has it (the default), and unrolled per expert in the `experts unrolled`
    rows, so both kernels' rounding is measured."""
    return (
        ("wint8 (MatMulNBits 8-bit acc 4, QMoE)", ExportOptions(quantization=QuantSpec("wint8"))),
        ("wint8, fp32 head", ExportOptions(quantization=QuantSpec("wint8"), quantize_lm_head=False)),
        ("wint8, experts unrolled", ExportOptions(quantization=QuantSpec("wint8"), fused_moe=False)),
        ("wint8 weight-only (acc 0)", ExportOptions(quantization=QuantSpec("wint8"), weight_only=True)),
        ("wint4 g128 (MatMulNBits, QMoE acc 4)", ExportOptions(quantization=QuantSpec("wint4", 128))),
        ("wint4 g64", ExportOptions(quantization=QuantSpec("wint4", 64))),
        ("wint4 per channel", ExportOptions(quantization=QuantSpec("wint4", 0))),
        ("wint4 g128, fp32 head", ExportOptions(quantization=QuantSpec("wint4", 128), quantize_lm_head=False)),
        ("wint4 g128, experts unrolled", ExportOptions(quantization=QuantSpec("wint4", 128), fused_moe=False)),
        ("wint4 g128 weight-only (acc 0)", ExportOptions(quantization=QuantSpec("wint4", 128), weight_only=True)),
    )


def _session(path: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads or torch.get_num_threads()
    return inference_session(str(path), options, ["CPUExecutionProvider"])


def decode_logits(session: Any, config: Any, tokens: torch.Tensor) -> torch.Tensor:
    """float32 logits `[T, V]` after each token of one sequence `[T]`, fed one token per run."""
    kv_shape = (1, config.num_key_value_heads, 0, config.head_dim)
    past = [np.zeros(kv_shape, np.float32) for _ in range(2 * config.num_hidden_layers)]
    outputs = ["logits"] + [name for i in range(config.num_hidden_layers) for name in new_names(i)]
    rows = []
    for position, token in enumerate(tokens.tolist()):
        feed = {
            "input_ids": np.array([[token]]),
            "position_ids": np.array([[position]]),
            "attention_bias": np.zeros((1, 1, position + 1), np.float32),
            "logits_index": np.zeros(1, np.int64),
        }
        for i in range(config.num_hidden_layers):
            feed[past_names(i)[0]], feed[past_names(i)[1]] = past[2 * i], past[2 * i + 1]
        logits, *new = session.run(outputs, feed)
        past = [np.concatenate((p, n), axis=2) for p, n in zip(past, new, strict=True)]
        rows.append(torch.from_numpy(logits[0]))
    return torch.stack(rows)


def accuracy_table(
    workdir: Path, num_sequences: int, length: int, trained: bool = False
) -> list[tuple[str, int, float, float, int, int]]:
    """(variant, positions, top-1, mean KL, quantized bytes, float32 bytes) of each variant on the CPU
    benchmark model over random sequences, or with `trained` on the model trained here over held-out text
    (`ernie_serve.testing.trained`); prints each row as it comes."""
    from ernie_serve.bench.quantization import compare, sequences

    if trained:
        from ernie_serve.testing.trained import held_out_sequences, trained_checkpoint, trained_config

        config, checkpoint = trained_config(), str(trained_checkpoint())
        seqs = held_out_sequences(num_sequences, length)
    else:
        from ernie_serve.bench.workload import BENCH_MODEL, bench_checkpoint

        config, checkpoint = BENCH_MODEL, str(bench_checkpoint())
        seqs = sequences(num_sequences, length, config.vocab_size)

    def run(label: str, options: ExportOptions) -> tuple[list[torch.Tensor], Any]:
        out = workdir / label.split(" (")[0].replace(" ", "-").replace(",", "")
        stats = export_to_dir(config, checkpoint, out, options=options, check=False)
        session = _session(out / "model.onnx")
        return [decode_logits(session, config, s) for s in progress(seqs, label, unit="seq")], stats

    reference, base = run("float32", ExportOptions())
    print(f"float32 export: {base.full_precision_bytes / 2**20:.1f} MiB of weights", flush=True)
    print(f"{'variant':<42} {'positions':>9} {'top-1':>8} {'mean KL':>9} {'quantized MiB':>13} {'fp32 MiB':>9}")
    rows = []
    for label, options in variants():
        logits, stats = run(label, options)
        positions, top1, kl = compare(reference, logits)
        rows.append((label, positions, top1, kl, stats.quantized_bytes, stats.full_precision_bytes))
        print(
            f"{label:<42} {positions:>9} {top1 * 100:>7.2f}% {kl:>9.5f} {stats.quantized_bytes / 2**20:>13.1f} "
            f"{stats.full_precision_bytes / 2**20:>9.1f}",
            flush=True,
        )
    return rows


# ----- kernels -----


@dataclass
class Kernel:
    session: Any
    dequantized: np.ndarray  # [N, K] the weight it stands for


def _one_node(node: Any, k: int, n: int, arrays: dict[str, np.ndarray]) -> Any:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [node],
        "kernel",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        initializer=[numpy_helper.from_array(a, name) for name, a in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # the calling thread: its CPU time is the kernel's
    options.log_severity_level = 3
    return inference_session(model.SerializeToString(), options, ["CPUExecutionProvider"])


def dynamic_quantize_matmul_inputs(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """wint8 `weight` [N, K] as DynamicQuantizeMatMul's B (uint8 `[K, N]`, codes `q + 128`), b_scale (float32
    `[N]`, one per output channel) and b_zero_point (uint8 `[N]`, all 128)."""
    codes, scales = quantize(torch.from_numpy(weight), QuantSpec("wint8"))  # [N, K] int8, [N, 1]
    unsigned = (codes.t().to(torch.int16) + 128).to(torch.uint8)  # [K, N] in 1..255
    return unsigned.numpy(), scales[:, 0].numpy(), np.full(weight.shape[0], 128, np.uint8)


def kernel_candidates(k: int, n: int) -> dict[str, Kernel]:
    """onnxruntime's float32 and quantized products by one `[N, K]` weight (N(0, 0.05))."""
    from onnx import helper

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(n, k, generator=generator) * 0.05  # [N, K]
    w = weight.numpy()
    kernels = {"fp32 MatMul": Kernel(_one_node(helper.make_node("MatMul", ["x", "W"], ["y"]), k, n, {"W": w.T}), w)}
    for spec, level in ((QuantSpec("wint4", 128), 4), (QuantSpec("wint4", 64), 4), (QuantSpec("wint4", 0), 4)) + (
        (QuantSpec("wint4", 128), 0),
    ):
        quant = GraphQuantization(spec, accuracy_level=level)
        packed, scales = matmul_nbits_inputs(w, quant)
        node = helper.make_node(
            "MatMulNBits", ["x", "B", "s"], ["y"], domain=MS_DOMAIN, **quant.matmul_nbits_attributes(k, n)
        )
        label = f"MatMulNBits 4-bit {'g' + str(spec.group_size) if spec.group_size else 'per channel'} acc {level}"
        kernels[label] = Kernel(
            _one_node(node, k, n, {"B": packed, "s": scales}), dequantize(*quantize(weight, spec), spec).numpy()
        )
    spec8 = QuantSpec("wint8")
    codes, scales = quantize(weight, spec8)  # [N, K], [N, 1]
    deq8 = dequantize(codes, scales, spec8).numpy()
    dqmm = helper.make_node("DynamicQuantizeMatMul", ["x", "B", "s", "z"], ["y"], domain=MS_DOMAIN)
    u8, s8, z8 = dynamic_quantize_matmul_inputs(w)
    kernels["DynamicQuantizeMatMul uint8 codes, zp 128"] = Kernel(
        _one_node(dqmm, k, n, {"B": u8, "s": s8, "z": z8}), deq8
    )
    signed = {"B": codes.t().contiguous().numpy(), "s": s8, "z": np.zeros(n, np.int8)}
    kernels["DynamicQuantizeMatMul int8 codes"] = Kernel(_one_node(dqmm, k, n, signed), deq8)
    # reduce_range as onnxruntime's quantizer does it: 7-bit weight codes in [-63, 63]
    scale7 = weight.abs().amax(1).clamp_min(1e-12) / 63  # [N]
    codes7 = torch.round(weight / scale7[:, None]).clamp(-63, 63)
    reduced = {"B": codes7.t().to(torch.int8).contiguous().numpy(), "s": scale7.numpy(), "z": np.zeros(n, np.int8)}
    kernels["DynamicQuantizeMatMul int8 7-bit (reduce_range)"] = Kernel(
        _one_node(dqmm, k, n, reduced), (codes7 * scale7[:, None]).numpy()
    )
    q8 = GraphQuantization(QuantSpec("wint4", 128))  # MatMulNBits' 8-bit layout: block 128, codes q + 128
    blocks = -(-k // 128)
    padded = torch.nn.functional.pad(codes, (0, blocks * 128 - k)).to(torch.int16) + 128
    b8 = padded.to(torch.uint8).reshape(n, blocks, 128).numpy()
    attrs = q8.matmul_nbits_attributes(k, n) | {"bits": 8}
    node8 = helper.make_node("MatMulNBits", ["x", "B", "s"], ["y"], domain=MS_DOMAIN, **attrs)
    kernels["MatMulNBits 8-bit acc 4"] = Kernel(
        _one_node(node8, k, n, {"B": b8, "s": scales.expand(n, blocks).reshape(-1).numpy()}), deq8
    )
    return kernels


def cpu_time_medians(calls: dict[str, Callable[[], Any]], repeats: int, per_turn: int = 3) -> dict[str, float]:
    """Median CPU microseconds of single calls, the candidates taking turns."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():
        fn()
    for _ in range(repeats):
        for name, fn in calls.items():
            for _ in range(per_turn):
                started = time.thread_time()
                fn()
                samples[name].append((time.thread_time() - started) * 1e6)
    return {name: statistics.median(v) for name, v in samples.items()}


def kernel_table(shapes: Sequence[tuple[int, int]], rows: Sequence[int], repeats: int) -> None:
    for k, n in shapes:
        kernels = kernel_candidates(k, n)
        for m in rows:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).numpy()
            times = cpu_time_medians(
                {name: (lambda s=kn.session, x=x: s.run(None, {"x": x})) for name, kn in kernels.items()}, repeats
            )
            print(f"[{k} in, {n} out] x {m} rows: CPU us per call (one thread), error vs its dequantized weight")
            for name, kn in kernels.items():
                expected = x @ kn.dequantized.T
                error = np.abs(kn.session.run(None, {"x": x})[0] - expected).max() / np.abs(expected).max()
                print(f"  {name:<48} {times[name]:>10.1f} us   {error:.1e}")
            print(flush=True)


def main(
    kernels: bool = False,
    num_sequences: int = 16,
    length: int = 128,
    repeats: int = 7,
    threads: int | None = None,
    trained: bool = False,
) -> int:
    """`ernie-serve bench quantization --backend onnx`: print the tables; returns 0. `threads`: the accuracy
    sessions' intra-op threads (torch's count by default); kernels always run on one. `trained`: the model
    trained here, over held-out text, instead of the benchmark model."""
    if threads is not None:
        torch.set_num_threads(threads)
    if kernels:
        kernel_table(((4096, 4096), (512, 32000)), (1, 64), repeats)
        return 0
    import tempfile

    with tempfile.TemporaryDirectory(prefix="onnx-quant-bench-") as workdir:
        what = "held-out windows" if trained else "random sequences"
        print(f"teacher-forced: {num_sequences} {what} of {length} tokens, one token per graph run\n")
        accuracy_table(Path(workdir), num_sequences, length, trained)
    return 0
