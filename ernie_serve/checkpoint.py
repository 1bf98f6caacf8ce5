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
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
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
                if _skipped(name, config):
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


def _skipped(name: str, config: ModelConfig) -> bool:
    """Whether the -PT tensor `name` is in a checkpoint but not taken: MTP tensors, a tied model's LM head."""
    return name.startswith(IGNORED_PREFIXES) or (config.tie_word_embeddings and name == "lm_head.weight")


def missing_tensors(path: Path, names: list[str]) -> CheckpointError:
    """The error for a checkpoint at `path` without the on-disk tensors `names` (the first five shown)."""
    shown = ", ".join(repr(m) for m in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return CheckpointError(f"checkpoint {path} is missing tensor {shown}")


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


class CheckpointSlicer:
    """Reads a slice of one tensor, named and oriented as in -PT, from a checkpoint of either layout, through
    safetensors' `get_slice` over the memory-mapped file: only the slice's bytes are read, never the whole
    tensor (a tensor-parallel rank's share). A part of a fused -Paddle tensor is a slice of the fused tensor.
    Use it as a context manager; files are opened on first use."""

    def __init__(self, path: str | Path, config: ModelConfig) -> None:
        self.path, self.config = Path(path), config
        self.layout = detect_layout(self.path)
        self._files: dict[str, Path] = {}  # on-disk name -> its file
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            self._files = {name: self.path / file for name, file in weight_map.items()}
        else:
            for file in checkpoint_files(self.path):
                with safe_open(str(file), framework="pt", device="cpu") as reader:
                    self._files.update(dict.fromkeys(reader.keys(), file))
        self._stack = ExitStack()
        self._readers: dict[Path, object] = {}

    def __enter__(self) -> CheckpointSlicer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stack.close()

    def check(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Raise CheckpointError where the checkpoint lacks one of the -PT tensors named in `shapes`, holds a tensor
        that stands for none of them (MTP tensors, and the LM head when the embeddings are tied, are allowed: they
        are skipped), or has one of another shape. From the files' headers alone, before any tensor is read."""
        expected = dict.fromkeys(disk_name(name, self.layout) for name in shapes)  # ordered: the first missing shown
        missing = [source for source in expected if source not in self._files]
        if missing:
            raise missing_tensors(self.path, missing)
        for source, file in self._files.items():
            if source not in expected and not _skipped(_pt_prefix(source, self.layout), self.config):
                raise CheckpointError(f"unexpected tensor {source!r} in {file.name}: not part of this config")
        for name, shape in shapes.items():
            self.check_shape(name, shape)

    def check_shape(self, name: str, expected: tuple[int, ...]) -> None:
        """Raise CheckpointError unless the whole -PT tensor `name` has shape `expected` (from the header)."""
        if self.shape(name) != tuple(expected):
            raise CheckpointError(
                f"tensor {name!r} in {self.path} has shape {self.shape(name)}, expected {tuple(expected)} from "
                "config.json"
            )

    def _locate(self, name: str) -> tuple[str, bool, int, int | None]:
        """(on-disk name, stored transposed, offset and width of this part along the fused output dim)."""
        if self.layout == "pt":
            return name, False, 0, None
        source = disk_name(name, "paddle")
        # the rule of `_from_paddle`: every 2-D weight but the embedding is stored [in, out]
        ndim = len(self._slice(source).get_shape())
        transposed = ndim == 2 and name.endswith(".weight") and name != "model.embed_tokens.weight"
        c = self.config
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        parts = {".q_proj.": (0, q), ".k_proj.": (q, kv), ".v_proj.": (q + kv, kv)}
        for part, (offset, width) in parts.items():
            if ".self_attn" + part in name:
                return source, transposed, offset, width
        if source.endswith((".up_gate_proj.weight", ".up_gate_proj.bias")):
            half = self._slice(source).get_shape()[ndim - 1 if transposed else 0] // 2
            return source, transposed, (0 if ".gate_proj." in name else half), half
        return source, transposed, 0, None

    def _slice(self, source: str):  # noqa: ANN202 - safetensors' PySafeSlice has no public type
        file = self._files.get(source)
        if file is None:
            raise CheckpointError(f"checkpoint {self.path} is missing tensor {source!r}")
        reader = self._readers.get(file)
        if reader is None:
            reader = self._readers[file] = self._stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
        return reader.get_slice(source)  # type: ignore[attr-defined]

    def shape(self, name: str) -> tuple[int, ...]:
        """The -PT shape of the whole tensor `name` (from the file's header; no data is read)."""
        source, transposed, _, width = self._locate(name)
        shape = list(self._slice(source).get_shape())
        if transposed:
            shape.reverse()
        if width is not None:
            shape[0] = width
        return tuple(shape)

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        """Rows (`dim` 0) or columns (`dim` 1) `start:stop` of the -PT tensor `name`, in -PT orientation; the whole
        tensor when `dim` is None."""
        source, transposed, offset, width = self._locate(name)
        sliced = self._slice(source)
        ndim = len(sliced.get_shape())
        ranges = [slice(None)] * ndim
        out_dim = ndim - 1 if transposed else 0  # the -PT dim 0 on disk
        if width is not None:
            ranges[out_dim] = slice(offset, offset + width)
        if dim is not None:
            disk_dim = ndim - 1 - dim if transposed else dim
            base = ranges[disk_dim].start or 0
            ranges[disk_dim] = slice(base + start, base + stop)
        tensor = sliced[tuple(ranges)]
        if tensor.dtype == torch.uint16:  # raw bf16 bits (-Paddle)
            tensor = tensor.view(torch.bfloat16)
        return tensor.t() if transposed else tensor
