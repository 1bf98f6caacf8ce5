"""`ernie-serve export tensorrt`: build the engine ahead of time, into an engine cache directory.

The engine is keyed as `--backend tensorrt` keys it (cache.py), so serving with `--tensorrt-cache-dir DIR` and
the same model, `--dtype`, `--max-num-batched-tokens`, `--max-num-seqs` and `--max-model-len` on the same kind
of GPU loads it instead of building.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import torch

from ernie_serve.backends.tensorrt.backend import (
    TensorRTBackend,
    engine_profiles,
    obtain_engine,
    resolve_precision,
)
from ernie_serve.core.config import EngineSettings


def export_command(
    model: str,
    output: str,
    load_format: str = "auto",
    seed: int = 0,
    dtype: str = "auto",
    max_num_batched_tokens: int = 2048,
    max_num_seqs: int = 64,
    max_model_len: int | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Build (or find) the engine for these settings in `output`; print where it is and how to serve it.
    Returns the exit code: 0, or 1 with one line on `err` where TensorRT cannot run or the model is wrong."""
    out = out or sys.stdout
    err = err or sys.stderr
    reason = TensorRTBackend.availability()
    if reason:
        err.write(f"ernie-serve: error: cannot build a TensorRT engine here: {reason}\n")
        return 1
    import tensorrt as trt

    from ernie_serve.checkpoint import CheckpointError
    from ernie_serve.core.config import ModelConfigError
    from ernie_serve.models import resolve_model

    try:
        settings = EngineSettings(
            model=model,
            load_format=load_format,
            seed=seed,
            dtype=dtype,
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            backend="tensorrt",
        )
        resolved = resolve_model(settings)
        precision = resolve_precision(dtype, resolved.config.dtype)
        logger = trt.Logger(trt.Logger.WARNING)
        result = obtain_engine(
            trt,
            trt.Runtime(logger),
            logger,
            resolved.config,
            resolved.weights_path,
            seed,
            precision,
            engine_profiles(resolved.config, settings),
            Path(output),
            8 << 30,
            torch.device("cuda"),
        )
    except (ModelConfigError, CheckpointError, ValueError, OSError, RuntimeError) as exc:
        err.write(f"ernie-serve: error: {exc}\n")
        return 1
    state = "found in the cache" if result.cached else f"built in {result.seconds:.0f} s"
    out.write(
        f"engine for {model} ({precision}) {state}: {result.path} ({result.size / 2**20:.1f} MiB)\n"
        f"serve it with --backend tensorrt --tensorrt-cache-dir {output} and the same --dtype, "
        "--max-num-batched-tokens, --max-num-seqs and --max-model-len\n"
    )
    return 0
