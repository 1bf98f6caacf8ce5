"""`python -m ernie_serve.testing.gpu_check tensorrt`: the TensorRT backend on a GPU, against the torch backend.

The acceptance test of `--backend tensorrt` wherever TensorRT is installed (it could not be installed on any
machine this project was developed on, so nothing here has run yet). Every engine is built into a fresh cache
directory, so the build is measured.

1. tiny shapes (float32, random real-format checkpoints): build time and engine size, then greedy tokens of the
   TensorRT engine against the torch backend on the same GPU: every prompt identical;
2. `--model` (default the 21B-A3B preset, bfloat16, dummy weights): build time and engine size, greedy tokens
   against the torch backend (bfloat16 sums in another order may flip a near tie of random weights, so the row
   passes when every prompt's first token agrees, and reports how many prompts agree throughout), then one
   throughput row each for tensorrt and torch on the same workload.

Prints gpu_check's table. Exits 0 with one line where TensorRT or a CUDA GPU is missing (CI has neither).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ernie_serve.bench import throughput
from ernie_serve.logging import LOG_LEVELS, configure_logging
from ernie_serve.testing.gpu_check import CheckRow, _failed_row, report, throughput_row

TINY_SHAPES = ("moe_shared_tied", "dense_bias_headdim")
PROMPTS = [list(range(10 + i, 10 + i + n)) for i, n in enumerate((5, 17, 40, 64, 9, 31, 100, 3))]
TOKENS = 32


def skip_line() -> str | None:
    """Why this check cannot run here (the backend's own reason), or None."""
    from ernie_serve.backends.tensorrt.backend import TensorRTBackend

    reason = TensorRTBackend.availability()
    return f"gpu_check tensorrt: skipped, {reason}" if reason else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ernie_serve.testing.gpu_check tensorrt",
        description="TensorRT engines of the tiny shapes and --model: build time, engine size, greedy parity and "
        "throughput against the torch backend on the same GPU.",
    )
    parser.add_argument("--model", default="ernie-4.5-21b-a3b", help="preset or checkpoint dir (default: %(default)s)")
    parser.add_argument("--dtype", default="bfloat16", help="--model's dtype (default: %(default)s)")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=1000)
    parser.add_argument("--output-len", type=int, default=200)
    parser.add_argument("--max-num-seqs", type=int, default=16, help="both backends (default: %(default)s)")
    parser.add_argument("--skip-model", action="store_true", help="the tiny shapes only")
    parser.add_argument("--skip-throughput", action="store_true", help="no throughput rows")
    parser.add_argument("--output-json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="warning", help="(default: %(default)s)")
    return parser


def _greedy(backend: str, model: str, dtype: str, settings: dict) -> tuple[list[list[int]], float]:
    """Greedy tokens of PROMPTS, and the seconds the engine took to start (the build, for tensorrt)."""
    from ernie_serve import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=TOKENS, ignore_eos=True)
    started = time.monotonic()
    with LLM(model=model, backend=backend, device="cuda", dtype=dtype, **settings) as llm:
        ready = time.monotonic() - started
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    torch.cuda.empty_cache()
    return [o.outputs[0].token_ids for o in outputs], ready


def _engine_bytes(cache_dir: Path) -> int:
    return sum(p.stat().st_size for p in cache_dir.glob("*/engine.plan"))


def check_model(name: str, model: str, dtype: str, settings: dict, exact: bool) -> CheckRow:
    """One row: build into an empty cache, then greedy parity with the torch backend. `exact`: every token of
    every prompt must agree; else every prompt's first token."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-trt-") as cache_dir:
        os.environ["ERNIE_SERVE_TENSORRT_CACHE_DIR"] = cache_dir  # read by TensorRTOptions
        try:
            trt_tokens, build_seconds = _greedy("tensorrt", model, dtype, settings)
            size = _engine_bytes(Path(cache_dir))
        finally:
            del os.environ["ERNIE_SERVE_TENSORRT_CACHE_DIR"]
    torch_tokens, _ = _greedy("torch", model, dtype, settings)
    pairs = list(zip(trt_tokens, torch_tokens, strict=True))
    same = sum(a == b for a, b in pairs)
    first = sum(a[:1] == b[:1] for a, b in pairs)
    passed = same == len(pairs) if exact else first == len(pairs)
    failures = [f"prompt {i}: tensorrt {a[:8]}... torch {b[:8]}..." for i, (a, b) in enumerate(pairs) if a != b]
    result = (
        f"built in {build_seconds:.0f} s, engine {size / 2**20:.0f} MiB; {same}/{len(pairs)} identical, "
        f"{first}/{len(pairs)} first tokens"
    )
    return CheckRow(f"tensorrt vs torch {name} {dtype}", passed, result, failures=[] if passed else failures)


def run_throughput(args: argparse.Namespace, backend: str) -> CheckRow:
    config = throughput.ThroughputConfig(
        model=args.model,
        backends=(backend,),
        num_requests=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        decode_repeats=0,
        compare_transformers=False,
        engine_settings={
            "device": "cuda",
            "dtype": args.dtype,
            "load_format": "dummy" if not Path(args.model).is_dir() else "auto",
            "max_model_len": args.input_len + args.output_len,
            "max_num_batched_tokens": 8192,
            "max_num_seqs": args.max_num_seqs,
        },
    )
    return throughput_row(f"throughput {backend} {args.model} {args.dtype}", config)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    skip = skip_line()
    if skip:
        print(skip)
        return 0
    import tensorrt as trt

    from ernie_serve.testing.checkpoints import build_tiny_checkpoint

    configure_logging("console", args.log_level)
    print(f"device: {torch.cuda.get_device_name()}, TensorRT {trt.__version__}, torch {torch.__version__}")
    started = time.monotonic()
    rows: list[CheckRow] = []
    limits = {"max_num_seqs": args.max_num_seqs, "max_model_len": 512, "max_num_batched_tokens": 512}
    with tempfile.TemporaryDirectory(prefix="gpu-check-trt-tiny-") as scratch:
        for shape in TINY_SHAPES:
            try:
                checkpoint = build_tiny_checkpoint(Path(scratch) / shape, shape, disk_dtype=torch.float32)
                rows.append(check_model(shape, str(checkpoint), "float32", limits, exact=True))
            except Exception as exc:
                rows.append(_failed_row(f"tensorrt vs torch {shape} float32", exc))
    if not args.skip_model:
        load = {"load_format": "dummy"} if not Path(args.model).is_dir() else {}
        model_limits = {**limits, "max_model_len": 1024, "max_num_batched_tokens": 2048, **load}
        try:
            rows.append(check_model(args.model, args.model, args.dtype, model_limits, exact=False))
        except Exception as exc:
            rows.append(_failed_row(f"tensorrt vs torch {args.model} {args.dtype}", exc))
        if not args.skip_throughput:
            for backend in ("tensorrt", "torch"):
                try:
                    rows.append(run_throughput(args, backend))
                except Exception as exc:
                    rows.append(_failed_row(f"throughput {backend} {args.model} {args.dtype}", exc))
                torch.cuda.empty_cache()
    return report(rows, started, args.output_json)
