"""Fills an `ErnieForCausalLM` from a safetensors checkpoint (-PT or -Paddle layout, read one tensor at a time by
`ernie_serve.checkpoint`), or with seeded random weights for `--load-format dummy`."""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from ernie_serve.backends.torch.model import ErnieForCausalLM
from ernie_serve.checkpoint import CheckpointError, detect_layout, disk_name, iter_checkpoint, missing_tensors
from ernie_serve.logging import progress

__all__ = ["CheckpointError", "dummy_tensor", "init_dummy_weights", "load_safetensors"]


@torch.inference_mode()
def load_safetensors(model: ErnieForCausalLM, path: str | Path) -> None:
    path = Path(path)
    targets = dict(model.checkpoint_targets())
    loaded: set[str] = set()
    # a valid checkpoint yields exactly one tensor per target, so the target count is the bar's total
    tensors = iter_checkpoint(path, model.config)
    for item in progress(tensors, "loading weights", total=len(targets), unit="tensor"):
        name, tensor = item.name, item.tensor
        target = targets.get(name)
        if target is None:
            raise CheckpointError(f"unexpected tensor {item.describe()}: not part of this config")
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(
                f"tensor {item.describe()} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(target.shape)} from config.json"
            )
        # converts bf16/fp16 on disk to the compute dtype; a transposed source (-Paddle) is copied in place
        target.copy_(tensor)
        loaded.add(name)
    # named as on disk, where a fused tensor stands for all its parts
    layout = detect_layout(path)
    missing = list(dict.fromkeys(disk_name(name, layout) for name in targets if name not in loaded))
    if missing:
        raise missing_tensors(path, missing)


@torch.inference_mode()
def init_dummy_weights(model: ErnieForCausalLM, seed: int) -> None:
    """Random weights of the real shape (norms 1, correction bias 0): for benchmarks without downloads."""
    device = next(model.parameters()).device  # where the weights live: drawn there on CUDA
    for name, target in progress(list(model.checkpoint_targets()), "initializing dummy weights", unit="tensor"):
        target.copy_(dummy_tensor(name, tuple(target.shape), seed, device))


def dummy_tensor(name: str, shape: tuple[int, ...], seed: int, device: torch.device | None = None) -> torch.Tensor:
    """The dummy checkpoint tensor `name`: norms 1, correction bias 0, else N(0, 0.02) from a generator seeded
    by `seed` and the name, so a tensor-parallel rank draws the same tensor whole and keeps its slice.

    On a CUDA `device` the numbers are drawn there, by the device's own generator: drawing the 21B-A3B's 22
    billion numbers on one CPU core takes minutes, on the GPU a second. So dummy weights are the same for the
    same seed on one kind of device, not across CPU and CUDA (their generators differ)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, device=device)
    if name.endswith("e_score_correction_bias"):
        return torch.zeros(shape, device=device)
    on_cuda = device is not None and torch.device(device).type == "cuda"
    where = device if on_cuda else "cpu"
    generator = torch.Generator(device=where).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape, dtype=torch.float32, device=where).normal_(0.0, 0.02, generator=generator)
