"""The checks that need an NVIDIA GPU, in one command: `python -m ernie_serve.testing.gpu_check`.

On a CUDA machine it runs, on the GPU:

1. the backend conformance suite (`conformance.py`) on the tiny shapes, in bfloat16 and in float32;
2. `bench throughput` of a preset (default the 21B-A3B shape, random weights, bfloat16) on a workload like
   vLLM's recipe benchmarks: 16 prompts of 8,000 tokens, 1,000 generated for each, all submitted at once
   (`--small`: 4 prompts, 1,000 in, 100 out; `--num-prompts`, `--input-len`, `--output-len` for any size);

and prints one table: each check's result and, for the throughput run, output tok/s, mean TTFT, mean TPOT
and the KV pool in blocks. It exits 1 when a check fails. Where `torch.cuda.is_available()` is false it
prints one line saying so and exits 0, so that it can run anywhere (CI has no GPU). `--device cpu` runs the
same checks on the CPU instead, to rehearse this script on a machine without a GPU (with a small `--model`).

With `--quantization wint8,wint4` it adds, per scheme: teacher-forced top-1 agreement and KL against the
unquantized bfloat16 model of the same random weights, on the tiny shapes and on `--model`'s preset (a row
passes at the accuracy targets of docs/quantization.md: wint8 99%, wint4 90%), and a throughput row of `--model`
with that scheme, through torch's CUDA weight-only kernels (`backends/torch/quant.py`). `--trained-model` adds
a row per scheme on the small MoE trained on this machine (`trained.py`), over held-out text: random weights
are far harder on quantization than trained ones (docs/quantization.md, "Accuracy and memory").

This is the base that GPU work extends with rows of its own (quantization, tensor parallelism, TensorRT).
`python -m ernie_serve.testing.gpu_check parallel` runs the tensor-parallel checks (`gpu_parallel.py`),
`python -m ernie_serve.testing.gpu_check tensorrt` the TensorRT backend's (`gpu_tensorrt.py`).
Needs the test extra for the conformance suite (transformers): `pip install 'ernie-serve[test]'`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ernie_serve.bench import throughput
from ernie_serve.core.config import EngineSettings
from ernie_serve.logging import LOG_LEVELS, configure_logging, progress
from ernie_serve.testing.conformance import BackendConformance, CaseResult, conformance_cases

NO_GPU_LINE = "gpu_check: skipped, no CUDA GPU here (torch.cuda.is_available() is False)"
CONFORMANCE_DTYPES = ("bfloat16", "float32")
# (prompts, prompt tokens, output tokens): vLLM's recipe-style run, and a quick one
FULL_WORKLOAD = (16, 8000, 1000)
SMALL_WORKLOAD = (4, 1000, 100)
ACCURACY_TARGETS = {"wint8": 0.99, "wint4": 0.90}  # teacher-forced top-1 agreement (issue 10)


@dataclass
class CheckRow:
    """One row of the table: a check and its outcome; the figures are set for throughput runs only."""

    check: str
    passed: bool
    result: str
    output_tok_s: float | None = None
    ttft_ms: float | None = None  # mean over requests
    tpot_ms: float | None = None  # mean over requests of each one's mean inter-token latency
    kv_blocks: int | None = None
    failures: list[str] = field(default_factory=list)  # one line per failed case or the error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ernie_serve.testing.gpu_check",
        description="Backend conformance (bfloat16 and float32) and a throughput benchmark on the GPU, as one "
        "table. Prints one line and exits 0 where there is no CUDA GPU.",
    )
    parser.add_argument("--backend", default="torch", help="the backend to check (default: %(default)s)")
    parser.add_argument(
        "--device", default="cuda", help="cuda, cuda:N, or cpu to rehearse the script (default: %(default)s)"
    )
    parser.add_argument(
        "--model",
        default="ernie-4.5-21b-a3b",
        help="the throughput run's model: a preset (random weights) or a checkpoint directory (default: %(default)s)",
    )
    parser.add_argument("--dtype", default="bfloat16", help="the throughput run's dtype (default: %(default)s)")
    parser.add_argument(
        "--small",
        action="store_true",
        help=f"a quicker throughput run: {SMALL_WORKLOAD[0]} prompts, {SMALL_WORKLOAD[1]} tokens in, "
        f"{SMALL_WORKLOAD[2]} out (default: {FULL_WORKLOAD[0]}, {FULL_WORKLOAD[1]}, {FULL_WORKLOAD[2]})",
    )
    parser.add_argument("--num-prompts", type=int, default=None, help="throughput prompts (overrides --small)")
    parser.add_argument("--input-len", type=int, default=None, help="prompt tokens each (overrides --small)")
    parser.add_argument("--output-len", type=int, default=None, help="output tokens each (overrides --small)")
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=8192, help="engine step budget (default: %(default)s)"
    )
    parser.add_argument("--max-num-seqs", type=int, default=64, help="engine --max-num-seqs (default: %(default)s)")
    parser.add_argument(
        "--quantization",
        default="",
        help="also check these schemes, comma-separated (wint8, wint4): accuracy against bfloat16 on the tiny "
        "shapes and --model's preset, and a throughput row each (default: none)",
    )
    parser.add_argument(
        "--accuracy-sequences", type=int, default=8, help="sequences of 128 tokens per accuracy row (default: 8)"
    )
    parser.add_argument(
        "--trained-model",
        action="store_true",
        help="with --quantization: an accuracy row on the small MoE trained on this machine too, over held-out "
        "text (ernie_serve.testing.trained; trained on the CPU on first use and cached)",
    )
    parser.add_argument("--skip-conformance", action="store_true", help="run the throughput benchmark only")
    parser.add_argument("--skip-throughput", action="store_true", help="run the conformance suite only")
    parser.add_argument("--workdir", default=None, help="where conformance checkpoints go (default: a temp dir)")
    parser.add_argument("--output-json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="warning", help="(default: %(default)s)")
    return parser


def workload_size(args: argparse.Namespace) -> tuple[int, int, int]:
    """(prompts, input tokens, output tokens): explicit flags, else `--small`'s or the full run's."""
    base = SMALL_WORKLOAD if args.small else FULL_WORKLOAD
    given = (args.num_prompts, args.input_len, args.output_len)
    return tuple(g if g is not None else b for g, b in zip(given, base, strict=True))  # type: ignore[return-value]


def run_conformance(backend: str, device: str, dtype: str, workdir: Path) -> CheckRow:
    """Every conformance case on `device` in `dtype`, one row; the tiny checkpoints in `workdir` are built once
    and shared by the dtypes."""
    suite = BackendConformance(backend, workdir, device=device, dtype=dtype)
    results: list[CaseResult] = []
    try:
        for case in progress(conformance_cases(), f"conformance {dtype}", unit="case"):
            results += suite.run_all([case])
    finally:
        suite.close()
    failed = [r for r in results if not r.passed]
    seconds = sum(r.seconds for r in results)
    return CheckRow(
        f"conformance {backend} {dtype}",
        not failed,
        f"{len(results) - len(failed)}/{len(results)} passed, {seconds:.0f} s",
        failures=[r.error or r.name for r in failed],
    )


def quantization_schemes(args: argparse.Namespace) -> list[str]:
    schemes = [s.strip() for s in args.quantization.split(",") if s.strip()]
    unknown = [s for s in schemes if s not in ACCURACY_TARGETS]
    if unknown:
        raise SystemExit(f"gpu_check: --quantization takes {', '.join(ACCURACY_TARGETS)}; got {', '.join(unknown)}")
    return schemes


def run_quantization_accuracy(args: argparse.Namespace, scheme: str) -> list[CheckRow]:
    """One row per model (the tiny shapes, then `--model`'s preset, with random weights; with `--trained-model`
    the model trained here, over held-out text): `scheme` against bfloat16."""
    from ernie_serve.bench import quantization as bench
    from ernie_serve.models import PRESETS
    from ernie_serve.quantization import QuantSpec

    # (name, config, trained): `trained` marks the model trained here, whose checkpoint (trained on first use)
    # and held-out prompts are fetched inside the row's try, so a failure there is that row's, not the table's
    models: list[tuple[str, Any, bool]] = [(name, config, False) for name, config in bench.tiny_models()]
    if args.model in PRESETS:
        models.append((args.model, PRESETS[args.model], False))
    if args.trained_model:
        from ernie_serve.testing.trained import trained_config

        models.append(("trained MoE, held-out text", trained_config(), True))
    # the serving default's grouping (wint4: groups of 128), as `--quantization scheme` alone gives
    variant = bench.Variant(QuantSpec.of(scheme, EngineSettings.model_fields["quantization_group_size"].default))
    rows = []
    for name, config, trained in models:
        check = f"accuracy {variant.label} vs bf16, {name}"
        try:
            checkpoint, prompts = None, None
            if trained:
                from ernie_serve.testing.trained import held_out_sequences, trained_checkpoint

                checkpoint = trained_checkpoint()
                prompts = held_out_sequences(args.accuracy_sequences, 128)
            [row] = bench.accuracy_rows(
                name,
                config,
                checkpoint,
                [variant],
                args.accuracy_sequences,
                128,
                torch.device(args.device),
                torch.bfloat16,
                prompts=prompts,
            )
        except Exception as exc:
            rows.append(_failed_row(check, exc))
            continue
        target = ACCURACY_TARGETS[scheme]
        passed = row.top1 >= target
        result = f"top-1 {row.top1:.2%}, KL {row.kl:.4f}, {row.positions} positions"
        failures = [] if passed else [f"top-1 below the {target:.0%} target"]
        rows.append(CheckRow(check, passed, result, failures=failures))
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def run_throughput(args: argparse.Namespace, quantization: str | None = None) -> CheckRow:
    """`bench throughput` of `--model` on the workload (with `quantization`, if given), one row with its
    figures."""
    num_prompts, input_len, output_len = workload_size(args)
    config = throughput.ThroughputConfig(
        model=args.model,
        backends=(args.backend,),
        quantizations=(quantization,),
        num_requests=num_prompts,
        input_len=input_len,
        output_len=output_len,
        decode_repeats=0,  # TPOT of the run says it, without a second engine of a large model
        compare_transformers=False,
        engine_settings={
            "device": args.device,
            "dtype": args.dtype,
            "load_format": "dummy" if not Path(args.model).is_dir() else "auto",
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "max_num_seqs": args.max_num_seqs,
            # the context the run needs, and no more: on the CPU the KV pool is sized from it
            "max_model_len": input_len + output_len,
        },
    )
    check = f"throughput {args.model} {args.dtype}{f' {quantization}' if quantization else ''}"
    return throughput_row(check, config)


def throughput_row(check: str, config: throughput.ThroughputConfig) -> CheckRow:
    """Run `config` (one backend) and make its row: output tok/s, mean TTFT and TPOT, the KV pool."""
    _, results = throughput.run(config)
    result = results[0]
    return CheckRow(
        check,
        True,
        f"{result.system}: {config.num_requests} x {config.input_len} in / {config.output_len} out, "
        f"{result.seconds:.0f} s",
        output_tok_s=result.tokens_per_second,
        ttft_ms=result.ttft_ms["mean"] if result.ttft_ms else None,
        tpot_ms=result.tpot_ms["mean"] if result.tpot_ms else None,
        kv_blocks=result.kv_blocks,
    )


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: Sequence[CheckRow]) -> str:
    """One line per check, then one line per failure under the table."""
    width = max([len("check"), *(len(r.check) for r in rows)])
    result_width = max([len("result"), *(len(r.result) for r in rows)])
    lines = [
        f"{'check':<{width}}  {'result':<{result_width}}  {'out tok/s':>10}  {'TTFT ms':>9}  {'TPOT ms':>8}  "
        f"{'KV blocks':>9}"
    ]
    for r in rows:
        lines.append(
            f"{r.check:<{width}}  {r.result:<{result_width}}  {_cell(r.output_tok_s, '.1f'):>10}  "
            f"{_cell(r.ttft_ms, '.1f'):>9}  {_cell(r.tpot_ms, '.2f'):>8}  {_cell(r.kv_blocks, 'd'):>9}"
        )
    for r in rows:
        lines += [f"FAILED {r.check}: {failure}" for failure in r.failures]
    return "\n".join(lines)


def _failed_row(check: str, exc: BaseException) -> CheckRow:
    traceback.print_exc()  # the whole story on stderr; the table keeps one line
    return CheckRow(check, False, f"error: {type(exc).__name__}", failures=[f"{type(exc).__name__}: {exc}"])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the checks; 0 when every one passed (or there is no GPU to check), 1 otherwise. `parallel` or
    `tensorrt` as the first argument runs the tensor-parallel (`gpu_parallel`) or TensorRT (`gpu_tensorrt`)
    checks instead."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["parallel"]:
        # imported here: that module builds on this one's table
        from ernie_serve.testing import gpu_parallel

        return gpu_parallel.main(arguments[1:])
    if arguments[:1] == ["tensorrt"]:
        from ernie_serve.testing import gpu_tensorrt

        return gpu_tensorrt.main(arguments[1:])
    parser = build_parser()
    args = parser.parse_args(arguments)
    schemes = quantization_schemes(args)
    if args.trained_model and not schemes:
        parser.error("--trained-model adds accuracy rows to --quantization's: name the schemes too")
    try:
        on_cuda = torch.device(args.device).type == "cuda"
    except RuntimeError as exc:  # torch's own message names the accepted device strings
        parser.error(f"--device {args.device!r}: {exc}")
    if on_cuda and not torch.cuda.is_available():
        print(NO_GPU_LINE)
        return 0
    configure_logging("console", args.log_level)
    if on_cuda:
        print(f"device: {torch.cuda.get_device_name(torch.device(args.device))}, torch {torch.__version__}")
    started = time.monotonic()
    rows: list[CheckRow] = []
    if not args.skip_conformance:
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
            workdir = Path(args.workdir or scratch)
            for dtype in CONFORMANCE_DTYPES:
                try:
                    rows.append(run_conformance(args.backend, args.device, dtype, workdir))
                except Exception as exc:  # e.g. transformers missing: report it in the table, go on
                    rows.append(_failed_row(f"conformance {args.backend} {dtype}", exc))
        if on_cuda:
            torch.cuda.empty_cache()  # the KV pool is sized from free device memory: hand the suite's back
    for scheme in schemes:
        rows += run_quantization_accuracy(args, scheme)
    if not args.skip_throughput:
        for scheme in [None, *schemes]:
            try:
                rows.append(run_throughput(args, scheme))
            except Exception as exc:
                rows.append(_failed_row(f"throughput {args.model} {args.dtype} {scheme or ''}".rstrip(), exc))
            if on_cuda:
                torch.cuda.empty_cache()
    return report(rows, started, args.output_json)


def report(rows: Sequence[CheckRow], started: float, output_json: str | None) -> int:
    """Print the table and the total time, write the rows as JSON if asked; the exit code (0: every row
    passed). Shared by every gpu_check mode."""
    print(format_table(rows))
    print(f"total {time.monotonic() - started:.0f} s")
    if output_json:
        Path(output_json).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0 if all(r.passed for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
