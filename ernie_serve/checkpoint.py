"""Checkpoint formats: finds a checkpoint's safetensors files, tells the -PT layout from the -Paddle one by its
tensor names, and streams its tensors in -PT naming and `[out, in]` orientation, one on-disk tensor at a time.

Backends fill their parameters from `iter_checkpoint` and need no knowledge of either layout. The two layouts
(REFERENCE "Checkpoint layout"):

- "-PT" (HuggingFace transformers): `model.` prefix, linear weights `[out, in]`, q/k/v and gate/up separate.
- "-Paddle": `ernie.` prefix; every linear weight `[in, out]` (the LM head and the router too, not the
  `[V, H]` embedding); q/k/v fused as `self_attn.qkv_proj` `[H, q | k | v]`; gate and up fused as
  `up_gate_proj` `[H, gate | up]` (dense MLPs, routed and shared experts); bf16 possibly stored as raw uint16.

A fused tensor yields its parts as views of the one tensor read, so memory holds a single on-disk tensor at a
time, never the model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from safetensors import safe_open

from ernie_serve.core.config import ModelConfig
from ernie_serve.core.errors import UserError

Layout = Literal["pt", "paddle"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# The multi-token-prediction head is only for speculative decoding, which we do not run (matched on -PT names).
IGNORED_PREFIXES = (
    "model.mtp_block.",
    "model.mtp_emb_norm.",
    "model.mtp_hidden_norm.",
    "model.mtp_linear_proj.",
)

# on-disk prefix of the decoder's tensors, per layout (the LM head has none in either)
_PREFIX: dict[Layout, str] = {"pt": "model.", "paddle": "ernie."}


class CheckpointError(UserError, ValueError):
    """A checkpoint whose files or tensors do not match its config.json."""


class CheckpointTensor(NamedTuple):
    """One tensor as a backend takes it, with where it came from (for error messages)."""

    name: str  # -PT name, e.g. model.layers.0.self_attn.q_proj.weight
    tensor: torch.Tensor  # -PT shape (linear weights [out, in]); may be a non-contiguous view of `source`
    source: str  # the on-disk tensor name, e.g. ernie.layers.0.self_attn.qkv_proj.weight
    file: Path  # the safetensors file holding `source`

    def describe(self) -> str:
        """`'source' in file` (plus the -PT name when they differ), for error messages."""
        read_as = "" if self.name == self.source else f" (read as {self.name!r})"
        return f"{self.source!r}{read_as} in {self.file.name}"


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of the checkpoint directory `path`: the shards its index names, or the single
    model.safetensors. Called before loading (and by the ONNX export to fingerprint the weights)."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = [path / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{index.name} names {file.name}, which is not in {path}")
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        return [single]
    raise CheckpointError(f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def tensor_names(path: str | Path) -> list[str]:
    """Every tensor name in the checkpoint, from the index or the files' headers (no tensor data is read)."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        return list(json.loads(index.read_text())["weight_map"])
    names: list[str] = []
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as reader:
            names.extend(reader.keys())
    return names


def detect_layout(path: str | Path) -> Layout:
    """The checkpoint's layout, "pt" or "paddle", from the prefix of its decoder tensors; called before loading."""
    names = tensor_names(path)
    prefixes = {layout for layout, prefix in _PREFIX.items() if any(name.startswith(prefix) for name in names)}
    if len(prefixes) == 1:
        return prefixes.pop()
    found = "both 'model.' and 'ernie.'" if prefixes else "neither 'model.' (-PT) nor 'ernie.' (-Paddle)"
    raise CheckpointError(f"checkpoint {path} has tensor names with {found} prefixes: not an ERNIE 4.5 layout")


def disk_name(name: str, layout: Layout) -> str:
    """The on-disk name holding the -PT tensor `name` in `layout` (the fused tensor for a fused part); for error
    messages about tensors that are missing."""
    if layout == "pt":
        return name
    if name.startswith("model."):
        name = _PREFIX["paddle"] + name.removeprefix("model.")
    for part in ("q_proj", "k_proj", "v_proj"):
        name = name.replace(f".self_attn.{part}.", ".self_attn.qkv_proj.")
    for part in ("gate_proj", "up_proj"):
        name = name.replace(f".{part}.", ".up_gate_proj.")
    return name


def iter_checkpoint(path: str | Path, config: ModelConfig) -> Iterator[CheckpointTensor]:
    """Every tensor the model takes from the checkpoint directory `path`, file by file, in -PT naming and
    orientation; the backend's loader calls it once and copies each tensor into its parameter before the next
    is read. MTP tensors, and `lm_head.weight` when the embeddings are tied, are skipped unread."""
    path = Path(path)
    layout = detect_layout(path)
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as reader:
            for source in reader.keys():
                name = _pt_prefix(source, layout)
                if name.startswith(IGNORED_PREFIXES) or (config.tie_word_embeddings and name == "lm_head.weight"):
                    continue
                tensor = reader.get_tensor(source)
                if tensor.dtype == torch.uint16:
                    # -Paddle exports may store bf16 as its raw bits; same element size, so a free reinterpretation
                    tensor = tensor.view(torch.bfloat16)
                if layout == "pt":
                    yield CheckpointTensor(name, tensor, source, file)
                else:
                    yield from _from_paddle(CheckpointTensor(name, tensor, source, file), config)
                del tensor  # before the next read: only the consumer may still hold this one


def _pt_prefix(source: str, layout: Layout) -> str:
    prefix = _PREFIX[layout]
    return _PREFIX["pt"] + source.removeprefix(prefix) if source.startswith(prefix) else source


def _from_paddle(item: CheckpointTensor, config: ModelConfig) -> Iterator[CheckpointTensor]:
    """The -PT tensors in one -Paddle tensor: `[in, out]` weights transposed (as views), fused ones split."""
    name, tensor = item.name, item.tensor
    if tensor.dim() == 2 and name.endswith(".weight") and name != "model.embed_tokens.weight":
        tensor = tensor.t()  # [in, out] -> [out, in]; a view, copied into place by the loader
    base, _, kind = name.rpartition(".")  # kind: weight or bias
    if base.endswith(".self_attn.qkv_proj"):
        q = config.num_attention_heads * config.head_dim
        kv = config.num_key_value_heads * config.head_dim
        if tensor.shape[0] != q + 2 * kv:
            raise CheckpointError(
                f"fused tensor {item.describe()} has shape {tuple(item.tensor.shape)}: its q | k | v width "
                f"should be {q + 2 * kv} ({q} + {kv} + {kv}) from config.json"
            )
        stem = base.removesuffix("qkv_proj")
        yield item._replace(name=f"{stem}q_proj.{kind}", tensor=tensor[:q])  # [q, H] or [q]
        yield item._replace(name=f"{stem}k_proj.{kind}", tensor=tensor[q : q + kv])  # [kv, H] or [kv]
        yield item._replace(name=f"{stem}v_proj.{kind}", tensor=tensor[q + kv :])  # [kv, H] or [kv]
    elif base.endswith(".up_gate_proj"):
        if tensor.shape[0] % 2:
            raise CheckpointError(
                f"fused tensor {item.describe()} has shape {tuple(item.tensor.shape)}: "
                "its gate | up width is odd, so it cannot hold two equal halves"
            )
        n = tensor.shape[0] // 2
        stem = base.removesuffix("up_gate_proj")
        yield item._replace(name=f"{stem}gate_proj.{kind}", tensor=tensor[:n])  # [I, H] or [I]
        yield item._replace(name=f"{stem}up_proj.{kind}", tensor=tensor[n:])  # [I, H] or [I]
    else:
        yield item._replace(tensor=tensor)
