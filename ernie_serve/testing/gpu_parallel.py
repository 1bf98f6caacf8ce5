"""`python -m ernie_serve.testing.gpu_check parallel`: tensor parallelism over NCCL on the GPUs found.

1. token identity: greedy tokens of `--tensor-parallel-size N` equal those of one GPU, in float32 (bfloat16
   sums in another order may flip a near tie, which says nothing about the split), on the ~70M benchmark
   checkpoint or `--identity-model`;
2. throughput of TP=1 and TP=N (bfloat16, `--model`: by default the 21B-A3B shape with random weights) on
   `bench throughput`'s fixed-length workload, one row each.

Prints the same table as `gpu_check`. Exits 0 with one line when fewer than two CUDA GPUs are visible (CI has
none); `--device cpu` rehearses everything over gloo on the CPU instead (with a small `--model`).
"""

from __future__ import annotations

import argparse
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import torch

from ernie_serve.bench import throughput
from ernie_serve.bench.workload import bench_checkpoint
from ernie_serve.logging import LOG_LEVELS, configure_logging
from ernie_serve.models import PRESETS, read_model_config
from ernie_serve.testing.gpu_check import CheckRow, report, throughput_row

IDENTITY_PROMPTS = [list(range(10 + i, 10 + i + n)) for i, n in enumerate((5, 17, 40, 64, 9, 31, 100, 3))]
IDENTITY_TOKENS = 32


def skip_line(found: int) -> str:
    return f"gpu_check parallel: skipped, tensor parallelism needs 2 CUDA GPUs and {found} are visible"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ernie_serve.testing.gpu_check parallel",
        description="Tensor parallelism over NCCL: token identity with one GPU, then throughput of TP=1 and TP=N.",
    )
    parser.add_argument(
        "--tensor-parallel-size", type=int, default=None, help="ranks (default: every GPU, rounded down to 2^k)"
    )
    parser.add_argument("--expert-parallel", action="store_true", help="split routed experts by expert")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu to rehearse over gloo (default: %(default)s)")
    parser.add_argument("--identity-model", default=None, help="checkpoint for token identity (default: bench model)")
    parser.add_argument("--model", default="ernie-4.5-21b-a3b", help="throughput model: preset or checkpoint dir")
    parser.add_argument("--dtype", default="bfloat16", help="throughput dtype (default: %(default)s)")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=1000)
    parser.add_argument("--output-len", type=int, default=200)
    parser.add_argument("--skip-throughput", action="store_true", help="token identity only")
    parser.add_argument("--output-json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="warning", help="(default: %(default)s)")
    return parser


def _tokens(model: str, device: str, tensor_parallel_size: int, expert_parallel: bool) -> list[list[int]]:
    from ernie_serve import LLM, SamplingParams

    options = {"enable_expert_parallel": True} if expert_parallel else {}
    params = SamplingParams(temperature=0, max_tokens=IDENTITY_TOKENS, ignore_eos=True)
    with LLM(model=model, device=device, dtype="float32", tensor_parallel_size=tensor_parallel_size, **options) as llm:
        outputs = llm.generate([{"prompt_token_ids": p} for p in IDENTITY_PROMPTS], params)
    return [o.outputs[0].token_ids for o in outputs]


def check_identity(args: argparse.Namespace, n: int) -> CheckRow:
    model = args.identity_model or str(bench_checkpoint())
    one = _tokens(model, args.device, 1, False)
    many = _tokens(model, args.device, n, args.expert_parallel)
    pairs = list(zip(one, many, strict=True))
    same = sum(a == b for a, b in pairs)
    failures = [f"prompt {i}: TP=1 {a[:8]}... TP={n} {b[:8]}..." for i, (a, b) in enumerate(pairs) if a != b]
    return CheckRow(
        f"tokens TP={n} vs TP=1 float32", same == len(one), f"{same}/{len(one)} identical", failures=failures
    )


def run_throughput(args: argparse.Namespace, n: int) -> CheckRow:
    options = {"backend_options": {"enable_expert_parallel": True}} if args.expert_parallel and n > 1 else {}
    config = throughput.ThroughputConfig(
        model=args.model,
        num_requests=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        decode_repeats=0,
        compare_transformers=False,
        engine_settings={
            "device": args.device,
            "dtype": args.dtype,
            "load_format": "dummy" if not Path(args.model).is_dir() else "auto",
            "max_model_len": args.input_len + args.output_len,
            "max_num_batched_tokens": 8192,
            "tensor_parallel_size": n,
            **options,
        },
    )
    return throughput_row(f"throughput TP={n} {args.model} {args.dtype}", config)


def _heads(model: str) -> int:
    config = PRESETS.get(model) or read_model_config(model)
    return config.num_attention_heads


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    on_cuda = torch.device(args.device).type == "cuda"
    found = torch.cuda.device_count() if on_cuda and torch.cuda.is_available() else 0
    n = args.tensor_parallel_size
    if on_cuda:
        if found < 2 or (n is not None and n > found):
            print(skip_line(found))
            return 0
        if n is None:
            n = 2 ** (found.bit_length() - 1)
            while _heads(args.model) % n:
                n //= 2
        print(f"devices: {found} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, TP={n} over NCCL")
    n = n or 2
    configure_logging("console", args.log_level)
    started = time.monotonic()
    rows: list[CheckRow] = []
    checks = [("identity", lambda: check_identity(args, n))]
    if not args.skip_throughput:
        checks += [(f"throughput TP={size}", lambda size=size: run_throughput(args, size)) for size in (1, n)]
    for name, check in checks:
        try:
            rows.append(check())
        except Exception as exc:
            traceback.print_exc()
            rows.append(CheckRow(name, False, f"error: {type(exc).__name__}", failures=[f"{exc}"]))
        if on_cuda:
            torch.cuda.empty_cache()
    return report(rows, started, args.output_json)
