"""Tensor and expert parallelism of the torch backend's model, applied to one rank's shard after construction.

`backends/torch/model.py` is a single-device model. A rank builds it from `ParallelLayout.local_config` (its
share of heads, widths, experts and vocabulary rows), `shard` sets the model's hooks (sums of partial outputs,
the vocab-parallel embedding and logits), and `load_shard` fills it with only this rank's slices of each
checkpoint tensor. The collectives themselves come from `backends/torch/distributed.py`.

How each tensor is split over N ranks (Megatron-style; vLLM and FastDeploy do the same):
- attention: q/k/v column-parallel by heads (fused, so one product), o_proj row-parallel: each rank's output
  is partial and one all-reduce per attention block sums them. KV heads are split when N divides them; when
  they are fewer than N (and divide N) each rank keeps the one KV head its query heads read, replicated on
  N/K ranks. Each rank's KV cache holds only its KV heads.
- dense MLP and shared experts: gate/up column-parallel, down row-parallel; one all-reduce per MLP block.
- routed experts: without expert parallelism each expert's gate/up/down is split like a dense MLP (every rank
  holds a 1/N slice of every expert); with it (`--enable-expert-parallel`) rank r holds experts
  [r*E/N, (r+1)*E/N) whole. Either way the router runs replicated and the block's partial outputs (routed and
  shared together) take one all-reduce (docs/parallelism.md says why not all_to_all).
- embedding and LM head: vocab-parallel, V/N rows each (rounded up, the last rank's tail zero-padded); the
  lookup's partial rows are all-reduced, the logits gathered on rank 0, which samples.
The residual (and the output biases) are added on rank 0 only, so the all-reduce counts them once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ernie_serve.backends.torch.loader import dummy_tensor
from ernie_serve.backends.torch.model import MLP, Attention, ErnieForCausalLM, SparseMoE
from ernie_serve.checkpoint import CheckpointError, CheckpointSlicer
from ernie_serve.core.config import ModelConfig
from ernie_serve.core.errors import UserError
from ernie_serve.logging import progress

if TYPE_CHECKING:
    from ernie_serve.backends.torch.distributed import Collectives


class ParallelConfigError(UserError, ValueError):
    """A parallel layout the checkpoint cannot be split into (heads, widths or experts not divisible)."""


@dataclass(frozen=True)
class ParallelLayout:
    """What rank `rank` of `world_size` holds. Computed on every rank from the same config and flags."""

    rank: int
    world_size: int
    expert_parallel: bool
    heads: tuple[int, int]  # query heads [start, stop) of this rank
    kv_heads: tuple[int, int]  # KV heads [start, stop) of this rank
    vocab: tuple[int, int]  # vocabulary rows [start, stop) of this rank's embedding / LM head (stop may pass V)
    vocab_size: int  # V, the whole vocabulary
    experts: tuple[int, int]  # routed experts [start, stop) held whole (all of them without expert parallelism)

    @classmethod
    def plan(cls, config: ModelConfig, rank: int, world_size: int, expert_parallel: bool) -> ParallelLayout:
        """Called at start-up on every rank, before any worker starts loading: raises `ParallelConfigError`
        with one line when the checkpoint cannot be split over `world_size` ranks."""
        n = world_size
        flag = f"--tensor-parallel-size {n}"
        q, k = config.num_attention_heads, config.num_key_value_heads
        if q % n:
            raise ParallelConfigError(f"{flag}: the model's {q} attention heads do not split evenly over {n} ranks")
        if k % n and n % k:
            raise ParallelConfigError(
                f"{flag}: the model's {k} KV heads can be neither split over {n} ranks nor replicated evenly "
                f"(one of {k} and {n} must divide the other)"
            )
        layers = range(config.num_hidden_layers)
        if any(not config.is_moe_layer(i) for i in layers) and config.intermediate_size % n:
            raise ParallelConfigError(
                f"{flag}: intermediate_size {config.intermediate_size} does not split evenly over {n} ranks"
            )
        e = config.moe_num_experts
        if config.is_moe:
            shared = config.moe_num_shared_experts * config.moe_intermediate_size
            if shared % n:
                raise ParallelConfigError(f"{flag}: the shared experts' width {shared} does not split over {n} ranks")
            if expert_parallel and e % n:
                raise ParallelConfigError(
                    f"{flag} --enable-expert-parallel: the model's {e} routed experts do not split evenly over "
                    f"{n} ranks"
                )
            if not expert_parallel and config.moe_intermediate_size % n:
                raise ParallelConfigError(
                    f"{flag}: moe_intermediate_size {config.moe_intermediate_size} does not split evenly over {n} "
                    "ranks (--enable-expert-parallel splits by expert instead)"
                )
        heads = q // n
        kv = k // n if k % n == 0 else 1
        kv_start = rank * heads // (q // k)  # the KV head this rank's first query head reads
        rows = -(-config.vocab_size // n)
        experts = (rank * e // n, (rank + 1) * e // n) if expert_parallel and config.is_moe else (0, e)
        return cls(
            rank=rank,
            world_size=n,
            expert_parallel=expert_parallel and config.is_moe,
            heads=(rank * heads, (rank + 1) * heads),
            kv_heads=(kv_start, kv_start + kv),
            vocab=(rank * rows, (rank + 1) * rows),
            vocab_size=config.vocab_size,
            experts=experts,
        )

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The config of this rank's shard as a single-device model: its heads, widths, experts, vocab rows."""
        n = self.world_size
        return replace(
            config,
            num_attention_heads=config.num_attention_heads // n,
            num_key_value_heads=self.kv_heads[1] - self.kv_heads[0],
            intermediate_size=config.intermediate_size // n,
            vocab_size=self.vocab[1] - self.vocab[0],
            moe_intermediate_size=config.moe_intermediate_size // (1 if self.expert_parallel else n),
            moe_num_experts=self.experts[1] - self.experts[0],
        )

    def describe(self, config: ModelConfig) -> dict[str, str]:
        """What is split how, for the start-up log and `ernie-serve plugins` (one line per kind of tensor)."""
        n = self.world_size
        q, k = config.num_attention_heads, config.num_key_value_heads
        kv = f"{k} KV heads split, {k // n} per rank"
        if k % n:
            kv = f"{k} KV heads replicated, each on {n // k} ranks"
        split = {
            "attention": f"q/k/v column-parallel, o_proj row-parallel: {q} query heads, {q // n} per rank; {kv}",
            "mlp": "dense and shared experts: gate/up column-parallel, down row-parallel",
            "vocab": f"embedding and LM head vocab-parallel, {self.vocab[1] - self.vocab[0]} rows per rank; "
            "logits gathered on rank 0",
        }
        if config.is_moe:
            e = config.moe_num_experts
            split["experts"] = (
                f"expert-parallel: {e} routed experts, {e // n} whole experts per rank"
                if self.expert_parallel
                else f"{e} routed experts, each split like an MLP ({config.moe_intermediate_size // n} of "
                f"{config.moe_intermediate_size} columns per rank)"
            )
        return split


# ----- the model's hooks -----
def shard(model: ErnieForCausalLM, layout: ParallelLayout, collectives: Collectives) -> None:
    """Called once on every rank after constructing the model from `layout.local_config` and before loading:
    turns it into this rank's shard of the whole model."""
    first = layout.rank == 0
    for layer in model.layers:
        blocks: list[Attention | MLP | SparseMoE] = [layer.attn, layer.mlp]
        for block in blocks:
            block.reduce = collectives.all_reduce
            block.adds_residual = first
        if not first:  # output biases are added once, with the residual, on rank 0
            layer.attn.o_bias = None
            mlp = layer.mlp.shared if isinstance(layer.mlp, SparseMoE) else layer.mlp
            if mlp is not None:
                mlp.down_bias = None
        if isinstance(layer.mlp, SparseMoE) and layout.expert_parallel:
            _expert_parallel(model, layer.mlp, layout)
    model.embed_hook = lambda ids: _vocab_parallel_embedding(model.embed_weight, layout.vocab[0], ids, collectives)
    model.logits_hook = lambda logits: collectives.gather_columns(logits)[:, : layout.vocab_size]


def _vocab_parallel_embedding(
    weight: torch.Tensor,  # [V/N, H] this rank's rows
    start: int,
    input_ids: torch.Tensor,  # [T]
    collectives: Collectives,
) -> torch.Tensor:  # [T, H]
    local = input_ids - start
    outside = (local < 0) | (local >= weight.shape[0])  # [T] rows other ranks hold
    x = F.embedding(local.clamp(0, weight.shape[0] - 1), weight).masked_fill_(outside.unsqueeze(1), 0)  # [T, H]
    return collectives.all_reduce(x)  # exactly one rank contributes each row


def _expert_parallel(model: ErnieForCausalLM, moe: SparseMoE, layout: ParallelLayout) -> None:
    """The MoE block of a rank holding experts `layout.experts` whole: the router over all experts, the shared
    experts split like an MLP, and a routed path over the local experts only."""
    config = model.config
    e, h = layout.experts[1] - layout.experts[0], config.hidden_size
    total = e * layout.world_size
    device = next(model.parameters()).device  # where the weights live: drawn there on CUDA
    moe.router_weight = nn.Parameter(torch.empty(total, h, device=device), requires_grad=False)  # [E, H] fp32
    moe.score_bias = nn.Parameter(torch.empty(total, device=device), requires_grad=False)  # [E]
    if moe.shared is not None:
        width = config.moe_num_shared_experts * config.moe_intermediate_size // layout.world_size
        dtype = model.embed_weight.dtype
        moe.shared = MLP(h, width, config.use_bias, dtype, device, model.quantization)
        if layout.rank:
            moe.shared.down_bias = None
    first = layout.experts[0]
    moe.routed_hook = lambda x, experts, weights, residual: _local_experts(moe, first, x, experts, weights, residual)


def _local_experts(
    moe: SparseMoE,
    first: int,  # global id of this rank's expert 0
    x: torch.Tensor,  # [T, H]
    experts: torch.Tensor,  # [T, k] global expert ids
    weights: torch.Tensor,  # [T, k] routing weights
    residual: torch.Tensor,  # [T, H]
) -> torch.Tensor:  # residual + the weighted outputs of this rank's experts [T, H]
    """The assignments routed to this rank's experts, grouped by expert, one product per active expert."""
    local = experts.flatten() - first  # [T*k]
    mine = ((local >= 0) & (local < moe.num_experts)).nonzero().squeeze(1)  # [A] assignments handled here
    if mine.numel() == 0:
        return residual
    local = local.index_select(0, mine)  # [A]
    order = torch.argsort(local, stable=True)  # [A] grouped by expert
    picked = mine.index_select(0, order)  # [A] flat (token, slot) indices
    token_of = picked // moe.top_k  # [A]
    counts = torch.bincount(local, minlength=moe.num_experts).tolist()
    x_sorted = x.index_select(0, token_of)  # [A, H]
    # [n_e, H] for each of this rank's experts that has rows
    outputs = [moe.run_expert(e, rows) for e, rows in enumerate(x_sorted.split(counts)) if rows.shape[0]]
    y = torch.cat(outputs)  # [A, H]
    y *= weights.flatten().index_select(0, picked).unsqueeze(-1).to(y.dtype)
    return residual.index_add(0, token_of, y)


# ----- which slice of each checkpoint tensor a rank reads -----
class Shard(NamedTuple):
    """One rank's part of a -PT checkpoint tensor."""

    name: str  # the -PT name in the checkpoint (an expert's global number)
    dim: int | None  # -PT dim split across ranks; None: read whole
    start: int
    stop: int  # may pass `full` for the padded vocabulary
    full: int  # the whole tensor's length along `dim`


_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")


def shard_of(name: str, shape: tuple[int, ...], config: ModelConfig, layout: ParallelLayout) -> Shard:
    """The slice of checkpoint tensor `name` that fills a local target of `shape` (-PT orientation)."""
    r, d = layout.rank, config.head_dim
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return Shard(name, 0, *layout.vocab, config.vocab_size)
    if ".self_attn." in name:
        q = (layout.heads[0] * d, layout.heads[1] * d, config.num_attention_heads * d)
        if ".q_proj." in name:
            return Shard(name, 0, *q)
        if ".k_proj." in name or ".v_proj." in name:
            return Shard(name, 0, layout.kv_heads[0] * d, layout.kv_heads[1] * d, config.num_key_value_heads * d)
        if name.endswith("o_proj.weight"):
            return Shard(name, 1, *q)
        return Shard(name, None, 0, 0, 0)  # o_proj bias: rank 0 adds it whole
    expert = _EXPERT.search(name)
    if expert and layout.expert_parallel:  # whole experts, numbered globally on disk
        number = int(expert.group(1)) + layout.experts[0]
        return Shard(name.replace(expert.group(0), f".mlp.experts.{number}."), None, 0, 0, 0)
    if name.endswith(("gate_proj.weight", "up_proj.weight", "gate_proj.bias", "up_proj.bias")):
        return Shard(name, 0, r * shape[0], (r + 1) * shape[0], shape[0] * layout.world_size)
    if name.endswith("down_proj.weight"):
        return Shard(name, 1, r * shape[1], (r + 1) * shape[1], shape[1] * layout.world_size)
    return Shard(name, None, 0, 0, 0)  # norms, router, correction bias, down biases: replicated or rank 0's


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """The padded vocabulary's missing rows (the last rank's tail) as zeros: their logits are cut off."""
    if tensor.shape[0] == rows:
        return tensor
    return torch.cat((tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])))


@torch.inference_mode()
def load_shard(model: ErnieForCausalLM, path: str | Path, config: ModelConfig, layout: ParallelLayout) -> None:
    """Fill this rank's shard from the checkpoint at `path` (either layout), reading only its slices; called
    once by every rank after `shard`. `config` is the whole model's."""
    targets = list(model.checkpoint_targets())
    with CheckpointSlicer(path, config) as checkpoint:
        for name, target in progress(targets, "loading this rank's weights", unit="tensor"):
            shard = shard_of(name, tuple(target.shape), config, layout)
            whole = list(target.shape)
            if shard.dim is not None:
                whole[shard.dim] = shard.full
            checkpoint.check_shape(shard.name, tuple(whole))  # from the header: a wrong tensor is never sliced
            if shard.dim is None:
                tensor = checkpoint.read(shard.name)
            else:
                tensor = checkpoint.read(shard.name, shard.dim, shard.start, min(shard.stop, shard.full))
                if shard.dim == 0:
                    tensor = _pad_rows(tensor, shard.stop - shard.start)
            if tuple(tensor.shape) != tuple(target.shape):
                raise CheckpointError(
                    f"tensor {shard.name!r} in {path}: this rank's slice has shape {tuple(tensor.shape)}, expected "
                    f"{tuple(target.shape)} from config.json"
                )
            target.copy_(tensor)


@torch.inference_mode()
def init_dummy_shard(model: ErnieForCausalLM, config: ModelConfig, layout: ParallelLayout, seed: int) -> None:
    """This rank's slices of the same random weights `loader.init_dummy_weights` gives the whole model (each
    tensor drawn whole from a seed of its own name, then sliced), so that every world size serves one model."""
    device = next(model.parameters()).device  # where the weights live: drawn there on CUDA
    for name, target in progress(list(model.checkpoint_targets()), "initializing dummy weights", unit="tensor"):
        shard = shard_of(name, tuple(target.shape), config, layout)
        shape = list(target.shape)
        if shard.dim is not None:
            shape[shard.dim] = shard.full
        tensor = dummy_tensor(shard.name, tuple(shape), seed, device)
        if shard.dim is not None:
            tensor = tensor.narrow(shard.dim, shard.start, min(shard.stop, shard.full) - shard.start)
            if shard.dim == 0:
                tensor = _pad_rows(tensor, shard.stop - shard.start)
        target.copy_(tensor)


def split_weight_bytes(model: ErnieForCausalLM) -> dict[str, int]:
    """Resident weight bytes of a model (or of a rank's shard), as `split` (what tensor parallelism divides:
    projections, experts, embedding, LM head; quantized codes and scales included) and `replicated` (norms,
    routers, correction biases). Index buffers and the oneDNN kernel copies are not counted."""
    split = replicated = 0
    weights = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if n.endswith(("rows", "scales")))]
    for name, tensor in weights:
        if tensor.dtype == torch.long:  # the MoE's row-number buffers, not weights
            continue
        size = tensor.numel() * tensor.element_size()
        if "norm" in name or "router_weight" in name or "score_bias" in name:
            replicated += size
        else:
            split += size
    return {"split": split, "replicated": replicated}
