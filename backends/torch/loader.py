"""Fills an `ErnieForCausalLM` from HuggingFace safetensors checkpoints, one tensor at a time (mmap'd), or with
seeded random weights for `--load-format dummy`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ernie_serve.backends.torch.model import ErnieForCausalLM
from ernie_serve.core.errors import UserError
from ernie_serve.logging import progress

# The multi-token-prediction head is only for speculative decoding, which we do not run.
IGNORED_PREFIXES = (
    "model.mtp_block.",
    "model.mtp_emb_norm.",
    "model.mtp_hidden_norm.",
    "model.mtp_linear_proj.",
)


class CheckpointError(UserError, ValueError):
    """A checkpoint whose tensors do not match its config.json."""


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{index.name} names {file.name}, which is not in {path}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{path} has neither model.safetensors nor model.safetensors.index.json")


def _checkpoint_tensors(path: Path, tied: bool) -> Iterator[tuple[Path, Any, str]]:
    """(file, its open reader, tensor name) for every tensor the model takes, file by file."""
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as reader:
            for name in reader.keys():
                if not (name.startswith(IGNORED_PREFIXES) or (tied and name == "lm_head.weight")):
                    yield file, reader, name


@torch.inference_mode()
def load_safetensors(model: ErnieForCausalLM, path: str | Path) -> None:
    path = Path(path)
    targets = dict(model.checkpoint_targets())
    loaded: set[str] = set()
    # a valid checkpoint holds exactly one tensor per target, so the target count is the bar's total
    tensors = _checkpoint_tensors(path, model.config.tie_word_embeddings)
    for file, reader, name in progress(tensors, "loading weights", total=len(targets), unit="tensor"):
        target = targets.get(name)
        if target is None:
            raise CheckpointError(f"unexpected tensor {name!r} in {file.name}: not part of this config")
        tensor = reader.get_tensor(name)
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(
                f"tensor {name!r} in {file.name} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(target.shape)} from config.json"
            )
        target.copy_(tensor)  # converts bf16/fp16 on disk to the compute dtype
        loaded.add(name)
    missing = [name for name in targets if name not in loaded]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint {path} is missing tensor {shown}")


@torch.inference_mode()
def init_dummy_weights(model: ErnieForCausalLM, seed: int) -> None:
    """Random weights of the real shape (norms 1, correction bias 0): for benchmarks without downloads."""
    generator = torch.Generator().manual_seed(seed)
    targets = list(model.checkpoint_targets())
    for name, target in progress(targets, "initializing dummy weights", unit="tensor"):
        if name.endswith("norm.weight"):
            target.fill_(1.0)
        elif name.endswith("e_score_correction_bias"):
            target.zero_()
        else:
            chunk = torch.empty(target.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=generator)
            target.copy_(chunk)
